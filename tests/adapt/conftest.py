"""Fixtures for the adapt tests: a tiny random backbone and a handful of real NIH images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chexfound.models import create_backbone


@pytest.fixture(scope="session")
def tiny_backbone():
    torch.manual_seed(0)
    return create_backbone("tiny_vit").eval()


@pytest.fixture(scope="session")
def nih_paths(data_root: Path) -> list[Path]:
    paths = sorted((data_root / "nih14" / "images").glob("*.png"))[:6]
    assert len(paths) == 6
    return paths
