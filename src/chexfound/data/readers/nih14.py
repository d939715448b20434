"""NIH ChestX-ray14: the official release and the shared subset layout.

Official release (Wang et al. 2017; NIH Clinical Center): `Data_Entry_2017_v2020.csv` (or the original
`Data_Entry_2017.csv`) with columns "Image Index", "Finding Labels" ("A|B" or "No Finding"), "Follow-up #",
"Patient ID", "Patient Age" (integer, or "058Y" in the 2017 file), "Patient Gender", "View Position", ...;
images in `images/` or the `images_001/images/` ... `images_012/images/` folders of the tarballs;
`train_val_list.txt` / `test_list.txt` give the official patient-disjoint split;
`BBox_List_2017.csv` has expert boxes ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]").
"""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from chexfound.data.findings import NIH14, finding_map
from chexfound.data.manifest import Manifest, read_manifest
from chexfound.data.readers._common import (
    MissingPolicy,
    apply_missing,
    find_file,
    find_optional,
    index_images,
    log,
    make_manifest,
    normalise_split,
    read_csv,
)
from chexfound.errors import ManifestError

_ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")


def _age(v: object) -> float:
    m = re.match(r"\s*(\d+)\s*([YMD])?", str(v))
    if not m:
        return float("nan")
    n, unit = float(m.group(1)), (m.group(2) or "Y")
    return n if unit == "Y" else n / 12.0 if unit == "M" else n / 365.0


def read_nih14(
    root: str | PathLike[str], image_root: str | PathLike[str] | None = None, missing: MissingPolicy = "drop"
) -> Manifest:
    """Manifest of the official NIH ChestX-ray14 release: 14 multi-hot columns (NIH spelling), `split`
    train/test from the official lists when present."""
    root = Path(root)
    if not any((root / n).is_file() or (root / f"{n}.gz").is_file() for n in _ENTRY_FILES) and \
            (root / "labels.csv").is_file():
        raise ManifestError(root, "no Data_Entry_2017*.csv here, but a labels.csv: this looks like the shared "
                                  "subset layout (use --format nih14-shared / read_nih14_shared)")
    entry = find_file(root, _ENTRY_FILES, "NIH Data_Entry_2017*.csv")
    raw = read_csv(entry, required=["Image Index", "Finding Labels", "Patient ID"], dtype={"Patient ID": str})
    img_root = Path(image_root) if image_root else root
    index = index_images(img_root, (".png",))
    if not index:
        raise ManifestError(img_root, "no PNG images found (expected images/ or images_0NN/images/)")
    names = raw["Image Index"].astype(str).str.strip()
    df = pd.DataFrame({
        "path": [str(index.get(n, Path("images") / n)) for n in names],
        "patient_id": raw["Patient ID"].astype(str).str.strip().str.lstrip("0").replace("", "0"),
        "image_id": names,
        "view": raw.get("View Position", pd.Series([None] * len(raw))),
        "follow_up": raw.get("Follow-up #", pd.Series([np.nan] * len(raw))),
        "age": raw["Patient Age"].map(_age) if "Patient Age" in raw else np.nan,
        "sex": raw.get("Patient Gender", pd.Series([None] * len(raw))),
        "finding_labels": raw["Finding Labels"].astype(str),
    })
    canon = finding_map([*NIH14], NIH14)
    by_norm = {k.lower().replace(" ", "_"): v for k, v in canon.items()}
    y = np.zeros((len(df), len(NIH14)), np.float32)
    col = {n: j for j, n in enumerate(NIH14)}
    for i, labs in enumerate(df["finding_labels"]):
        for lab in labs.split("|"):
            key = lab.strip().lower().replace(" ", "_")
            if key in ("no_finding", ""):
                continue
            if key not in by_norm:
                raise ManifestError(entry, f"row {i} ({names.iloc[i]}): unknown finding {lab!r}")
            y[i, col[by_norm[key]]] = 1.0
    for j, n in enumerate(NIH14):
        df[n] = y[:, j]
    test_list = find_optional(root, ["test_list.txt"])
    if test_list is not None:
        test_ids = set(test_list.read_text().split())
        df["split"] = np.where(df["image_id"].isin(test_ids), "test", "train")
    df = apply_missing(df, img_root, missing, entry)
    return make_manifest(df, img_root, NIH14, entry)


def read_nih14_shared(root: str | PathLike[str]) -> Manifest:
    """The `labels.csv` layout of ../shared/data/nih14* (already one multi-hot column per finding, NIH
    spelling). Label columns are the 14 NIH findings, in NIH14 order."""
    root = Path(root)
    m = read_manifest(root / "labels.csv")
    missing = [n for n in NIH14 if n not in m.df.columns]
    if missing:
        raise ManifestError(m.source, f"missing NIH finding column(s) {missing}")
    m.label_columns = list(NIH14)
    if "split" in m.df.columns:
        m.df["split"] = m.df["split"].map(normalise_split)  # nih14-tiny64 says "valid"
        leaks = m.df.groupby(m.df["patient_id"].astype(str))["split"].nunique()
        if (leaks > 1).any():
            log.warning("%s: %d patient(s) appear in several of the given splits; re-split by patient "
                        "(chexfound manifest --split-seed N)", m.source, int((leaks > 1).sum()))
    return m


def read_nih14_boxes(path: str | PathLike[str]) -> pd.DataFrame:
    """Expert boxes as a DataFrame (image_id, finding, x, y, w, h) from NIH's BBox_List_2017.csv or the
    shared boxes.csv. Finding names are those of NIH14 ("Infiltrate" in the box file -> "Infiltration")."""
    p = Path(path)
    raw = read_csv(p)
    if "Image Index" in raw.columns:  # official: the header "Bbox [x,y,w,h]" splits into 4 columns
        need = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]
        miss = [c for c in need if c not in raw.columns]
        if miss:
            raise ManifestError(p, f"missing column(s) {miss} for an NIH BBox_List_2017 file")
        df = pd.DataFrame({"image_id": raw["Image Index"], "finding": raw["Finding Label"], "x": raw["Bbox [x"],
                           "y": raw["y"], "w": raw["w"], "h": raw["h]"]})
    else:
        miss = [c for c in ("image_id", "finding", "x", "y", "w", "h") if c not in raw.columns]
        if miss:
            raise ManifestError(p, f"missing column(s) {miss} (expected image_id, finding, x, y, w, h)")
        df = raw[["image_id", "finding", "x", "y", "w", "h"]].copy()
    fmap = finding_map(sorted(set(df["finding"].astype(str))), NIH14)
    unknown = sorted(set(df["finding"].astype(str)) - set(fmap))
    if unknown:
        raise ManifestError(p, f"unknown finding name(s) {unknown}")
    df["finding"] = df["finding"].astype(str).map(fmap)
    for c in ("x", "y", "w", "h"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float32)
    return df.reset_index(drop=True)
