"""CheXpert (Irvin et al. 2019): `train.csv` / `valid.csv` (and the later `test_labels.csv`).

Columns: "Path" (e.g. "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"), "Sex", "Age",
"Frontal/Lateral", "AP/PA", then the 14 observations with 1.0 positive, 0.0 negative, -1.0 uncertain and
blank = not mentioned. The manifest keeps exactly those semantics (blank -> NaN, -1 uncertain).
"""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from chexfound.data.findings import CHEXPERT14
from chexfound.data.manifest import Manifest
from chexfound.data.readers._common import MissingPolicy, apply_missing, find_optional, make_manifest, read_csv
from chexfound.errors import ManifestError

_PATIENT = re.compile(r"(patient\d+)/(study\d+)/")


def _path_prefix(root: Path, paths: pd.Series) -> tuple[Path, int]:
    """CSV paths start with the dataset folder name; find which base (root's parent, root itself, or root
    after dropping the first component) makes them exist. Returns (base, components to drop)."""
    sample = [str(p) for p in paths.head(20)]
    for base, drop in ((root.parent, 0), (root, 0), (root, 1)):
        for p in sample:
            parts = Path(p).parts[drop:]
            if parts and (base.joinpath(*parts)).is_file():
                return base, drop
    return root.parent, 0  # nothing exists: report against the documented layout


def read_chexpert(
    root: str | PathLike[str], missing: MissingPolicy = "drop", frontal_only: bool = False
) -> Manifest:
    """Manifest of CheXpert's train.csv (split "train"), valid.csv ("val") and test_labels.csv ("test")
    where present. `root` is the folder holding the CSVs (e.g. CheXpert-v1.0-small)."""
    root = Path(root)
    files = [(name, split) for name, split in (("train.csv", "train"), ("valid.csv", "val"),
                                               ("test_labels.csv", "test"), ("test.csv", "test"))]
    frames, sources = [], []
    seen_test = False
    mroot: Path | None = None  # the manifest root: the base that the first label file's paths hang from
    for name, split in files:
        f = find_optional(root, [name])
        if f is None or (split == "test" and seen_test):
            continue
        seen_test |= split == "test"
        raw = read_csv(f, required=["Path", *CHEXPERT14])
        base, drop = _path_prefix(root, raw["Path"])
        mroot = mroot or base
        rel = raw["Path"].astype(str).map(lambda p, d=drop: Path(*Path(p).parts[d:]).as_posix())
        if base != mroot:
            rel = rel.map(lambda r, b=base: (b / r).as_posix())
        pid = raw["Path"].astype(str).str.extract(_PATIENT)
        if pid[0].isna().any():
            bad = raw["Path"].iloc[int(np.flatnonzero(pid[0].isna().to_numpy())[0])]
            raise ManifestError(f, f"cannot find patientNNNNN/studyN in path {bad!r}")
        df = pd.DataFrame({
            "path": rel,
            "patient_id": pid[0],
            "study_id": pid[0] + "/" + pid[1],
            "view": np.where(raw.get("Frontal/Lateral", pd.Series(["Frontal"] * len(raw))).astype(str) == "Lateral",
                             "LATERAL", raw.get("AP/PA", pd.Series([None] * len(raw))).astype(object)),
            "frontal_lateral": raw.get("Frontal/Lateral", pd.Series([None] * len(raw))),
            "sex": raw.get("Sex", pd.Series([None] * len(raw))),
            "age": pd.to_numeric(raw.get("Age", pd.Series([np.nan] * len(raw))), errors="coerce"),
            "split": split,
        })
        for c in CHEXPERT14:
            df[c] = pd.to_numeric(raw[c], errors="coerce")
        frames.append(df)
        sources.append(f)
    if not frames:
        raise ManifestError(root, "no CheXpert label file found (train.csv / valid.csv)")
    df = pd.concat(frames, ignore_index=True)
    if frontal_only:
        df = df[df["frontal_lateral"].astype(str) != "Lateral"].reset_index(drop=True)
    assert mroot is not None
    df = apply_missing(df, mroot, missing, sources[0])
    return make_manifest(df, mroot, CHEXPERT14, sources[0])
