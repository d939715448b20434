"""Turn public datasets' own label files/layouts into manifests (more readers land with the data issue)."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np

from chexfound.data.manifest import Manifest, read_manifest
from chexfound.errors import ManifestError


def read_nih14_shared(root: str | PathLike[str]) -> Manifest:
    """The `labels.csv` layout of ../shared/data/nih14* (already one multi-hot column per finding)."""
    return read_manifest(Path(root) / "labels.csv")


def read_kermany(root: str | PathLike[str]) -> Manifest:
    """Kermany et al. 2018 paediatric set (`labels.csv` with label NORMAL/PNEUMONIA and official splits).

    Label column `PNEUMONIA` (1/0). `patient_key` is only unique within a split, so patient ids are
    prefixed by split (they already are: `test:N1-0001`).
    """
    m = read_manifest(Path(root) / "labels.csv", labels=[])
    df = m.df
    if "label" not in df.columns:
        raise ManifestError(m.source, "Kermany labels.csv needs a 'label' column (NORMAL/PNEUMONIA)")
    df["PNEUMONIA"] = (df["label"].astype(str).str.upper() == "PNEUMONIA").astype(np.float32)
    m.label_columns = ["PNEUMONIA"]
    return m
