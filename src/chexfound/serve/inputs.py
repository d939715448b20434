"""Turn `chexfound predict` arguments (files, folders, a manifest) into a list of image paths."""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path
from typing import Iterable, Sequence

from chexfound.errors import ManifestError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic", ".tif", ".tiff"})


def looks_like_dicom(path: Path) -> bool:
    """Part-10 DICOM files carry 'DICM' after a 128-byte preamble (many PACS exports have no extension)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_image_file(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    return path.suffix == "" and looks_like_dicom(path)


def walk_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order; hidden files and folders are skipped."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and is_image_file(p):
                found.append(p)
    return found


def manifest_paths(path: str | PathLike[str], split: str | None = None) -> list[Path]:
    """The `path` column of a manifest (CSV or Parquet), relative paths resolved against its folder.
    Prediction needs no labels or patient ids, so only `path` is required here; with `split`, only the rows
    whose `split` column equals it (as `evaluate --split` scores them)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise ManifestError(p, "manifest file not found")
    try:
        cols = ["path"] + (["split"] if split is not None else [])
        df = pd.read_parquet(p, columns=cols) if p.suffix == ".parquet" else pd.read_csv(p, usecols=cols)
    except ValueError as e:
        raise ManifestError(p, f"missing required column(s) {cols} ({e})") from e
    except Exception as e:
        raise ManifestError(p, f"cannot parse manifest ({e})") from e
    if split is not None:
        df = df[df["split"].astype(str) == split]
        if df.empty:
            raise ManifestError(p, f"no rows with split == {split!r}")
    out = []
    for q in map(Path, df["path"].dropna().astype(str)):
        out.append(q if q.is_absolute() else p.parent / q)
    return out


def collect_inputs(inputs: Sequence[str | PathLike[str]], manifest: str | PathLike[str] | None = None,
                   split: str | None = None) -> list[Path]:
    """Files as given (a missing or unreadable one is kept, so the run lists it as skipped), folders
    expanded recursively, manifest rows appended; duplicates dropped, first occurrence kept."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        found.extend(walk_images(p) if p.is_dir() else [p])
    if manifest is not None:
        found.extend(manifest_paths(manifest, split))
    return _unique(found)


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen: set[str] = set()
    out = []
    for p in paths:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
