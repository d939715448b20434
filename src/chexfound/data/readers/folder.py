"""Class-folder layouts (ImageFolder-style) and the Kermany paediatric set.

`root/<class>/*.ext` or `root/<split>/<class>/*.ext` with split folders named train/val/valid/test...
Each class becomes a 1/0 column (one-hot) and the `label` column holds the class name. Patient ids come
from `patient_regex` (first group, or whole match) applied to the file name, else the file stem (each image
its own patient: only right when the dataset has one image per patient).
"""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from chexfound.data.manifest import Manifest, read_manifest
from chexfound.data.readers._common import IMAGE_SUFFIXES, SPLIT_ALIASES, make_manifest
from chexfound.errors import ManifestError

# Kermany et al. 2018 file names: person1_bacteria_1.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-1018-0001.jpeg.
KERMANY_PATIENT_REGEX = r"^(person\d+|(?:NORMAL2-)?IM-\d+)"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def read_folder(root: str | PathLike[str], patient_regex: str | None = None) -> Manifest:
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(root, "not a folder")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_ALIASES]
    groups = [(d, SPLIT_ALIASES[d.name.lower()]) for d in split_dirs] if split_dirs else [(root, None)]
    rows = []
    for base, split in groups:
        for cdir in sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for p in _images(cdir):
                rows.append((p.relative_to(root).as_posix(), cdir.name, split, p.name))
    if not rows:
        raise ManifestError(root, "no images in class folders (expected root/<class>/*.png or "
                                  "root/<split>/<class>/*.png)")
    rx = re.compile(patient_regex) if patient_regex else None

    def patient(name: str, split: str | None) -> str:
        pid = Path(name).stem
        if rx is not None:
            m = rx.search(name)
            if m is None:
                raise ManifestError(root, f"--patient-regex {patient_regex!r} does not match file name {name!r}")
            pid = m.group(1) if m.groups() else m.group(0)
        return pid

    classes = sorted({r[1] for r in rows})
    df = pd.DataFrame({
        "path": [r[0] for r in rows],
        "patient_id": [patient(r[3], r[2]) for r in rows],
        "image_id": [r[3] for r in rows],
        "label": [r[1] for r in rows],
    })
    if split_dirs:
        df["split"] = [r[2] for r in rows]
    for c in classes:
        df[c] = (df["label"] == c).astype(np.float32)
    return make_manifest(df, root, classes, None)


def read_kermany(root: str | PathLike[str]) -> Manifest:
    """Kermany et al. 2018 paediatric set (`labels.csv` with label NORMAL/PNEUMONIA and official splits).

    Label column `PNEUMONIA` (1/0). `patient_key` is only unique within a split, so patient ids are
    prefixed by split (they already are: `test:N1-0001`). Without labels.csv, the class folders under
    `root` (or root/dataset) are read with Kermany's file-name patient pattern, prefixed by split.
    """
    root = Path(root)
    if not (root / "labels.csv").is_file():
        base = root / "dataset" if (root / "dataset").is_dir() else root
        m = read_folder(base, KERMANY_PATIENT_REGEX)
        df = m.df
        if "split" in df.columns:
            df["patient_id"] = df["split"].astype(str) + ":" + df["patient_id"].astype(str)
        if "PNEUMONIA" not in df.columns:
            raise ManifestError(base, f"no PNEUMONIA class folder (classes: {m.label_columns})")
        m.label_columns = ["PNEUMONIA"]
        m.df = df.drop(columns=[c for c in ("NORMAL",) if c in df.columns])
        return m
    m = read_manifest(root / "labels.csv", labels=[])
    df = m.df
    if "label" not in df.columns:
        raise ManifestError(m.source, "Kermany labels.csv needs a 'label' column (NORMAL/PNEUMONIA)")
    df["PNEUMONIA"] = (df["label"].astype(str).str.upper() == "PNEUMONIA").astype(np.float32)
    m.label_columns = ["PNEUMONIA"]
    return m
