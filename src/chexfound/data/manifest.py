"""Manifests: one row per image, `path` + `patient_id` (+ optional study/view/split) + one column per label.

Label values: 1 positive, 0 negative, blank/NaN not labelled (masked from losses and metrics),
-1 uncertain (resolved by an `uncertain` policy: "nan" (ignore, default), "zero", "one").
`path` is absolute or relative to `root` (default: the manifest file's folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from chexfound.errors import ManifestError

# Columns that are never labels.
META_COLUMNS = frozenset(
    {"path", "image_id", "patient_id", "patient_key", "study_id", "view", "split", "age", "sex", "follow_up",
     "finding_labels", "folder_class", "subtype", "label", "dicom_id", "fpath", "source", "width", "height"}
)
UncertainPolicy = Literal["nan", "zero", "one"]


@dataclass
class Manifest:
    df: pd.DataFrame
    root: Path
    label_columns: list[str] = field(default_factory=list)
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.df)

    def paths(self) -> list[Path]:
        return [p if p.is_absolute() else self.root / p for p in map(Path, self.df["path"].astype(str))]

    def patients(self) -> np.ndarray:
        return self.df["patient_id"].astype(str).to_numpy()

    def labels(self, uncertain: UncertainPolicy = "nan") -> np.ndarray:
        """float32 [N, C]: 1/0, NaN where not labelled; -1 resolved by `uncertain`."""
        y = self.df[self.label_columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32, copy=True)
        fill = {"nan": np.nan, "zero": 0.0, "one": 1.0}[uncertain]
        y[y == -1] = fill
        return y

    def subset(self, mask: np.ndarray | Sequence[bool]) -> "Manifest":
        return Manifest(self.df[np.asarray(mask)].reset_index(drop=True), self.root, list(self.label_columns),
                        self.source)

    def split(self, name: str) -> "Manifest":
        if "split" not in self.df.columns:
            raise ManifestError(self.source, "manifest has no 'split' column")
        return self.subset(self.df["split"].astype(str).to_numpy() == name)

    def to_csv(self, path: str | PathLike[str]) -> None:
        from chexfound.models.format import atomic_write_bytes

        atomic_write_bytes(path, self.df.to_csv(index=False).encode())


def infer_label_columns(df: pd.DataFrame) -> list[str]:
    out = []
    for c in df.columns:
        if c in META_COLUMNS:
            continue
        v = pd.to_numeric(df[c], errors="coerce")
        if df[c].notna().sum() and v.notna().sum() != df[c].notna().sum():
            continue  # has non-numeric values
        if set(np.unique(v.dropna().to_numpy())) <= {-1.0, 0.0, 1.0}:
            out.append(c)
    return out


def read_manifest(
    path: str | PathLike[str],
    root: str | PathLike[str] | None = None,
    labels: Sequence[str] | None = None,
    check_paths: bool = False,
) -> Manifest:
    p = Path(path)
    if not p.is_file():
        raise ManifestError(p, "manifest file not found")
    try:
        df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    except Exception as e:
        raise ManifestError(p, f"cannot parse manifest ({e})") from e
    if "path" not in df.columns:
        raise ManifestError(p, f"missing required column 'path' (columns: {list(df.columns)})")
    if "patient_id" not in df.columns:
        if "patient_key" in df.columns:
            df["patient_id"] = df["patient_key"]
        else:
            raise ManifestError(p, "missing required column 'patient_id' (needed for patient-level splits)")
    if labels is None:
        label_cols = infer_label_columns(df)
    else:
        missing = [c for c in labels if c not in df.columns]
        if missing:
            raise ManifestError(p, f"missing label column(s) {missing}; available: {list(df.columns)}")
        label_cols = list(labels)
    m = Manifest(df.reset_index(drop=True), Path(root) if root else p.parent, label_cols, p)
    if check_paths:
        missing_files = [str(q) for q in m.paths() if not q.is_file()]
        if missing_files:
            raise ManifestError(p, f"{len(missing_files)} path(s) do not exist, e.g. {missing_files[:3]}")
    return m


def patient_split(
    patients: Sequence[str] | np.ndarray,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    names: Sequence[str] = ("train", "val", "test"),
    seed: int = 0,
) -> np.ndarray:
    """Assign each image a split name so that no patient is in two splits (seeded, by patient counts)."""
    if len(fractions) != len(names) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError("fractions must match names and sum to 1")
    pats = np.asarray(patients).astype(str)
    uniq = np.unique(pats)
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    bounds = np.round(np.cumsum(fractions) * len(uniq)).astype(int)
    assign = {}
    start = 0
    for name, end in zip(names, bounds):
        for q in uniq[start:end]:
            assign[q] = name
        start = end
    return np.array([assign[q] for q in pats])
