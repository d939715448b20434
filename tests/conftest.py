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
os.environ["CHEXFOUND_MODEL_MODULES"] = "chexfound.models.testing"
import chexfound.models.testing  # noqa: E402,F401


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"shared data not found at {DATA}; set CHEXFOUND_DATA")
    return DATA
