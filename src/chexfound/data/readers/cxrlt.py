"""CXR-LT 2024 (MICCAI challenge on MIMIC-CXR; PhysioNet "cxr-lt-iccv-workshop-cvamd" 2.0.0, folder
cxr-lt-2024): `train_labeled.csv`, `development_labeled_task1.csv`, `test_labeled_task1.csv` (or the
combined `labels.csv` with a `split` column), each with dicom_id, subject_id, study_id, ViewPosition,
fpath ("files/p10/p10000032/s5.../<dicom_id>.jpg", relative to the MIMIC-CXR-JPG root) and one 0/1 column
per finding; task 1 uses the 40 findings of `CXRLT24`.
"""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path

import pandas as pd

from chexfound.data.findings import CXRLT24
from chexfound.data.manifest import Manifest
from chexfound.data.readers._common import (
    MissingPolicy,
    apply_missing,
    find_optional,
    make_manifest,
    normalise_split,
    read_csv,
)
from chexfound.errors import ManifestError

_SPLIT_FILES = (
    ("train_labeled.csv", "train"),
    ("development_labeled_task1.csv", "val"),
    ("test_labeled_task1.csv", "test"),
)
# The CheXFound authors' own re-split (train/val/test.csv with fpath + the 40 columns).
_AUTHOR_FILES = (("train.csv", "train"), ("val.csv", "val"), ("test.csv", "test"))
_SUBJECT = re.compile(r"/p(\d+)/s(\d+)/")


def _frame(f: Path, split: str | None) -> pd.DataFrame:
    raw = read_csv(f)
    pcol = "fpath" if "fpath" in raw.columns else "path" if "path" in raw.columns else None
    miss = [c for c in CXRLT24 if c not in raw.columns]
    if pcol is None or miss:
        raise ManifestError(f, f"not a CXR-LT 2024 task-1 file: missing {(['fpath'] if pcol is None else []) + miss}")
    ids = raw[pcol].astype(str).str.extract(_SUBJECT)
    subject = raw["subject_id"].astype(str) if "subject_id" in raw.columns else ids[0]
    study = raw["study_id"].astype(str) if "study_id" in raw.columns else ids[1]
    if subject.isna().any():
        raise ManifestError(f, "no subject_id column and no /pNNN/sNNN/ in fpath to take patient ids from")
    df = pd.DataFrame({
        "path": raw[pcol].astype(str),
        "patient_id": subject,
        "image_id": raw["dicom_id"].astype(str) if "dicom_id" in raw.columns else raw[pcol].map(lambda p: Path(p).stem),
        "study_id": study,
        "view": raw.get("ViewPosition", pd.Series([None] * len(raw))),
        "split": split if split is not None else raw["split"].map(normalise_split),
    })
    for c in CXRLT24:
        df[c] = raw[c]
    return df


def read_cxrlt24(
    root: str | PathLike[str], image_root: str | PathLike[str] | None = None, missing: MissingPolicy = "drop"
) -> Manifest:
    """Manifest of CXR-LT 2024 task 1 (40 findings, CXRLT24 order). `image_root` is the MIMIC-CXR-JPG folder
    that `fpath` is relative to (default: `root`)."""
    root = Path(root)
    found = [(f, s) for n, s in _SPLIT_FILES if (f := find_optional(root, [n])) is not None]
    if not found:
        combined = find_optional(root, ["labels.csv"])
        if combined is not None:
            raw_cols = read_csv(combined, nrows=0).columns
            if "split" not in raw_cols:
                raise ManifestError(combined, "CXR-LT labels.csv has no 'split' column")
            found = [(combined, None)]
        else:
            found = [(f, s) for n, s in _AUTHOR_FILES if (f := find_optional(root, [n])) is not None]
    if not found:
        raise ManifestError(root, "no CXR-LT 2024 label file found (train_labeled.csv, "
                                  "development_labeled_task1.csv, test_labeled_task1.csv or labels.csv)")
    df = pd.concat([_frame(f, s) for f, s in found], ignore_index=True)
    img_root = Path(image_root) if image_root else root
    df = apply_missing(df, img_root, missing, found[0][0])
    return make_manifest(df, img_root, CXRLT24, found[0][0])
