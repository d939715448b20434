"""Helpers shared by the dataset readers: finding label files, reading them with clear errors, locating
images, and assembling a Manifest."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import pandas as pd

from chexfound.data.manifest import Manifest
from chexfound.errors import ManifestError

log = logging.getLogger("chexfound.data.readers")

MissingPolicy = Literal["drop", "keep", "error"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")


def find_file(root: Path, names: Sequence[str], what: str) -> Path:
    """The first of `names` (each also tried with .gz, in root and root/annotations) that exists."""
    for sub in (root, root / "annotations"):
        for n in names:
            for cand in (sub / n, sub / f"{n}.gz"):
                if cand.is_file():
                    return cand
    raise ManifestError(root, f"{what} not found (looked for {', '.join(names)} [.gz])")


def find_optional(root: Path, names: Sequence[str]) -> Path | None:
    try:
        return find_file(root, names, "")
    except ManifestError:
        return None


def read_csv(path: Path, required: Iterable[str] = (), **kw: object) -> pd.DataFrame:
    """pandas.read_csv with a ManifestError naming the file on parse errors or missing columns."""
    try:
        df = pd.read_csv(path, low_memory=False, **kw)  # type: ignore[arg-type]
    except Exception as e:
        raise ManifestError(path, f"cannot parse CSV ({type(e).__name__}: {e})") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ManifestError(path, f"missing column(s) {missing}; this file has {list(df.columns)}")
    return df


def index_images(root: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """file name -> path (relative to root) for every image under root (one walk; first one wins)."""
    out: dict[str, Path] = {}
    sfx = tuple(s.lower() for s in suffixes)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(sfx):
                out.setdefault(f, Path(os.path.relpath(os.path.join(dirpath, f), root)))
    return out


def apply_missing(df: pd.DataFrame, root: Path, policy: MissingPolicy, source: Path | None) -> pd.DataFrame:
    """Deal with rows whose image file does not exist under root: drop (default, with a warning), keep,
    or raise. A label file whose images are *all* missing is always an error (wrong --root)."""
    if policy == "keep" or df.empty:
        return df
    exists = np.fromiter(((root / p).is_file() for p in df["path"].astype(str)), dtype=bool, count=len(df))
    n_missing = int((~exists).sum())
    if n_missing == 0:
        return df
    example = df["path"].iloc[int(np.flatnonzero(~exists)[0])]
    if exists.sum() == 0:
        raise ManifestError(source, f"none of the {len(df)} images exist under {root} (e.g. {example}); "
                                    "is the image root right?")
    if policy == "error":
        raise ManifestError(source, f"{n_missing} of {len(df)} images do not exist under {root}, e.g. {example}")
    log.warning("%s: dropped %d of %d rows whose image is missing under %s (e.g. %s)",
                source, n_missing, len(df), root, example)
    out = df[exists].reset_index(drop=True)
    out.attrs["dropped_missing"] = n_missing
    return out


def make_manifest(df: pd.DataFrame, root: Path, labels: Sequence[str], source: Path | None) -> Manifest:
    """Order columns (ids first, labels last), make ids text and labels float, validate values."""
    df = df.copy()
    for c in ("patient_id", "image_id", "study_id", "view", "split"):
        if c in df.columns:
            df[c] = df[c].map(lambda v: None if pd.isna(v) else str(v))
    for c in labels:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float32)
    m = Manifest(df.reset_index(drop=True), root, list(labels), source)
    m.df = m.ordered_df()
    m.df.attrs.update(df.attrs)
    m.check_labels()
    return m


SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
                 "validation": "val", "dev": "val", "development": "val", "test": "test", "testing": "test"}


def normalise_split(value: object) -> str:
    s = str(value).strip().lower()
    return SPLIT_ALIASES.get(s, s)
