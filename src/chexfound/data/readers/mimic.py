"""MIMIC-CXR-JPG (Johnson et al. 2019; PhysioNet): study-level labels joined to images.

Files (usually gzipped): `mimic-cxr-2.0.0-metadata.csv` (dicom_id, subject_id, study_id, ViewPosition,
Rows, Columns, ...), `mimic-cxr-2.0.0-split.csv` (dicom_id, study_id, subject_id, split in
train/validate/test) and `mimic-cxr-2.0.0-chexpert.csv` or `-negbio.csv` (subject_id, study_id, then the 14
observations, 1/0/-1/blank like CheXpert). Images: files/p10/p10000032/s50414267/<dicom_id>.jpg.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Literal

import pandas as pd

from chexfound.data.findings import CHEXPERT14
from chexfound.data.manifest import Manifest
from chexfound.data.readers._common import (
    MissingPolicy,
    apply_missing,
    find_file,
    make_manifest,
    normalise_split,
    read_csv,
)


def mimic_image_path(subject_id: object, study_id: object, dicom_id: object) -> str:
    s = str(int(subject_id))
    return f"files/p{s[:2]}/p{s}/s{int(study_id)}/{dicom_id}.jpg"


def read_mimic(
    root: str | PathLike[str],
    labeler: Literal["chexpert", "negbio"] = "chexpert",
    missing: MissingPolicy = "drop",
    image_root: str | PathLike[str] | None = None,
) -> Manifest:
    """Manifest of MIMIC-CXR-JPG: one row per image, the study's labels (NaN where a study has no label
    row), `split` train/val/test from the official split file."""
    root = Path(root)
    meta_f = find_file(root, ["mimic-cxr-2.0.0-metadata.csv"], "MIMIC-CXR-JPG metadata")
    split_f = find_file(root, ["mimic-cxr-2.0.0-split.csv"], "MIMIC-CXR-JPG split file")
    lab_f = find_file(root, [f"mimic-cxr-2.0.0-{labeler}.csv"], f"MIMIC-CXR-JPG {labeler} labels")
    meta = read_csv(meta_f, required=["dicom_id", "subject_id", "study_id"])
    split = read_csv(split_f, required=["dicom_id", "split"])
    labels = read_csv(lab_f, required=["subject_id", "study_id", *CHEXPERT14])
    df = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="left")
    df = df.merge(labels[["subject_id", "study_id", *CHEXPERT14]], on=["subject_id", "study_id"], how="left")
    out = pd.DataFrame({
        "path": [mimic_image_path(a, b, c) for a, b, c in zip(df["subject_id"], df["study_id"], df["dicom_id"])],
        "patient_id": df["subject_id"].astype(int).astype(str),
        "image_id": df["dicom_id"].astype(str),
        "study_id": df["study_id"].astype(int).astype(str),
        "view": df.get("ViewPosition", pd.Series([None] * len(df))),
        "split": df["split"].map(lambda v: None if pd.isna(v) else normalise_split(v)),
    })
    for c in CHEXPERT14:
        out[c] = df[c]
    img_root = Path(image_root) if image_root else root
    out = apply_missing(out, img_root, missing, meta_f)
    return make_manifest(out, img_root, CHEXPERT14, lab_f)
