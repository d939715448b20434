"""Shared fixtures. Real images come from $CHEXFOUND_DATA (default ../shared/data); nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CHEXFOUND_DATA", REPO.parent / "shared" / "data")).resolve()

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The tiny test backbones (tiny_vit, tiny_vit_mlp) are not in the production registry: register them here
# and, through the environment, in CLI subprocesses the tests start.
from chexfound.models import testing as _tiny_configs  # noqa: E402

_tiny_configs.enable()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def data_missing() -> str | None:
    """Why the shared data cannot be used (None when it can): one reason, the same for every test."""
    if DATA.is_dir() and any(DATA.iterdir()):
        return None
    return (f"needs the shared data: {DATA} is not there (set CHEXFOUND_DATA=/path/to/data; in CI, where it must "
            f"be present, this fails instead)")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared real-image folder. Every test that reads it asks for this fixture (directly or through another
    fixture), so a clone without the data skips those tests with one reason; in CI (`CI` set) it fails."""
    why = data_missing()
    if why is not None:
        if _in_ci():
            pytest.fail(why)
        pytest.skip(why)
    return DATA


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "data: reads the shared data (set by the data_root fixture; skipped without it)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that read the shared data are integration tests: mark them `data`, so the fast lane
    # (`make test-fast`: -m "not slow and not data") runs the unit tests alone.
    for item in items:
        if "data_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)
