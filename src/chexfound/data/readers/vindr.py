"""VinDr-CXR (Nguyen et al. 2022; PhysioNet 1.0.0): image-level labels of 28 findings.

`annotations/image_labels_train.csv`: image_id, rad_id, then one 0/1 column per finding, one row per
(image, radiologist); 3 radiologists read each training image. `annotations/image_labels_test.csv`:
the 5-radiologist consensus, one row per image (its last-but-one column is spelled "Other disease").
Images: train/<image_id>.dicom, test/<image_id>.dicom. Patient identities were removed by the
de-identification, so each image is its own patient here.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from chexfound.data.findings import VINDR_CXR
from chexfound.data.manifest import Manifest
from chexfound.data.readers._common import (
    MissingPolicy,
    apply_missing,
    find_optional,
    index_images,
    make_manifest,
    read_csv,
)
from chexfound.errors import ManifestError

Vote = Literal["majority", "any"]


def _image_path(root: Path, split: str, image_id: str, index: dict[str, Path] | None) -> str:
    default = Path(split) / f"{image_id}.dicom"
    if index is None or (root / default).is_file():
        return default.as_posix()
    for ext in (".dicom", ".dcm", ".png", ".jpg", ".jpeg"):
        if f"{image_id}{ext}" in index:
            return index[f"{image_id}{ext}"].as_posix()
    return default.as_posix()


def read_vindr(root: str | PathLike[str], vote: Vote = "majority", missing: MissingPolicy = "drop") -> Manifest:
    """Manifest of VinDr-CXR. Training labels aggregate the radiologists: "majority" (default: positive
    when more than half marked it) or "any" (positive when at least one did)."""
    root = Path(root)
    frames, sources = [], []
    for name, split in (("image_labels_train.csv", "train"), ("image_labels_test.csv", "test")):
        f = find_optional(root, [name])
        if f is None:
            continue
        raw = read_csv(f, dtype={"image_id": str})
        raw = raw.rename(columns={"Other disease": "Other diseases"})
        miss = [c for c in ("image_id", *VINDR_CXR) if c not in raw.columns]
        if miss:
            raise ManifestError(f, f"missing column(s) {miss}")
        y = raw[list(VINDR_CXR)].apply(pd.to_numeric, errors="coerce").fillna(0.0)
        grp = y.groupby(raw["image_id"].astype(str), sort=False)
        n = grp.size()
        votes = grp.sum()
        if vote == "majority":
            lab = (votes.mul(2).gt(n, axis=0)).astype(np.float32)
        elif vote == "any":
            lab = (votes > 0).astype(np.float32)
        else:
            raise ValueError(f"vote must be 'majority' or 'any', not {vote!r}")
        df = lab.reset_index().rename(columns={"index": "image_id"})
        df.insert(1, "patient_id", df["image_id"])
        df.insert(2, "split", split)
        df.insert(3, "rad_count", n.to_numpy())
        frames.append(df)
        sources.append(f)
    if not frames:
        raise ManifestError(root, "no VinDr-CXR label file found (annotations/image_labels_train.csv / _test.csv)")
    df = pd.concat(frames, ignore_index=True)
    needs_index = any(not (root / s / f"{i}.dicom").is_file() for s, i in zip(df["split"].head(5), df["image_id"].head(5)))
    index = index_images(root) if needs_index else None
    df.insert(0, "path", [_image_path(root, s, i, index) for s, i in zip(df["split"], df["image_id"])])
    df = apply_missing(df, root, missing, sources[0])
    return make_manifest(df, root, VINDR_CXR, sources[0])
