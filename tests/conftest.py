"""Shared fixtures. Real images come from $CHEXFOUND_DATA (default ../shared/data); nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CHEXFOUND_DATA", REPO.parent / "shared" / "data")).resolve()

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"shared data not found at {DATA}; set CHEXFOUND_DATA")
    return DATA
