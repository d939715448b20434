"""Manifests: one row per image, `path` + `patient_id` (+ optional study/view/split) + one column per label.

Label values: 1 positive, 0 negative, blank/NaN not labelled (masked from losses and metrics),
-1 uncertain (resolved by an `uncertain` policy: "nan" (ignore, default), "zero", "one"; or a dict
{finding: policy} for per-finding policies such as CheXpert's U-Ones/U-Zeros mix).
`path` is absolute or relative to `root` (default: the manifest file's folder).
Files: CSV (optionally .gz) or Parquet, chosen by suffix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from chexfound.data.uncertain import UncertainSpec, resolve_uncertain
from chexfound.errors import ManifestError

# Columns that are never labels (also when a manifest is read back and its labels are inferred).
META_COLUMNS = frozenset(
    {"path", "image_id", "patient_id", "patient_key", "study_id", "view", "split", "age", "sex", "follow_up",
     "finding_labels", "folder_class", "subtype", "label", "dicom_id", "fpath", "source", "width", "height",
     "frontal_lateral", "label_method", "rad_count", "pixel_spacing", "projection"}
)
_ALLOWED_LABEL_VALUES = {-1.0, 0.0, 1.0}


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

    def labels(self, uncertain: UncertainSpec = "nan") -> np.ndarray:
        """float32 [N, C]: 1/0, NaN where not labelled; -1 resolved by `uncertain` (one policy for all
        findings, or a {finding: policy} dict where unnamed findings use "nan")."""
        y = self.df[self.label_columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32, copy=True)
        if isinstance(uncertain, str):
            policies = [uncertain] * len(self.label_columns)
        else:
            unknown = set(uncertain) - set(self.label_columns)
            if unknown:
                raise ValueError(f"uncertain policy names unknown finding(s) {sorted(unknown)}")
            policies = [uncertain.get(c, "nan") for c in self.label_columns]
        for j, pol in enumerate(policies):
            y[:, j] = resolve_uncertain(y[:, j], pol)
        return y

    def subset(self, mask: np.ndarray | Sequence[bool]) -> "Manifest":
        return Manifest(self.df[np.asarray(mask)].reset_index(drop=True), self.root, list(self.label_columns),
                        self.source)

    def split(self, name: str) -> "Manifest":
        if "split" not in self.df.columns:
            raise ManifestError(self.source, "manifest has no 'split' column")
        return self.subset(self.df["split"].astype(str).to_numpy() == name)

    def with_patient_split(
        self,
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        names: Sequence[str] = ("train", "val", "test"),
        seed: int = 0,
        within: str | None = None,
    ) -> "Manifest":
        """A copy with a seeded patient-level `split` column. `within="train"` re-splits only the rows now
        in that split (e.g. carve a val set out of an official train split), leaving the others."""
        df = self.df.copy()
        if within is None:
            df["split"] = patient_split(self.patients(), fractions, names, seed)
        else:
            if "split" not in df.columns:
                raise ManifestError(self.source, f"cannot split within {within!r}: no 'split' column")
            rows = df["split"].astype(str).to_numpy() == within
            if not rows.any():
                raise ManifestError(self.source, f"no rows in split {within!r}")
            df.loc[rows, "split"] = patient_split(self.patients()[rows], fractions, names, seed)
            leaks = _patients_in_several_splits(df)
            if leaks:
                raise ManifestError(self.source, f"patients in several splits after re-splitting, e.g. {leaks[:3]}")
        return Manifest(df, self.root, list(self.label_columns), self.source)

    def rebased(self, folder: str | PathLike[str]) -> "Manifest":
        """The same images with `path` rewritten for a manifest in `folder`: relative to `folder` where the
        image lies under it or was given as a relative path, otherwise absolute as given. Paths are normalised
        lexically (os.path), never resolved through symlinks: a manifest keeps the names the user chose."""
        base = os.path.abspath(folder)
        out = []
        for p in self.paths():
            a = os.path.abspath(p)
            if not p.is_absolute() or a == base or a.startswith(base.rstrip(os.sep) + os.sep):
                out.append(Path(os.path.relpath(a, base)).as_posix())
            else:
                out.append(Path(a).as_posix())
        df = self.df.copy()
        df["path"] = out
        return Manifest(df, Path(base), list(self.label_columns), self.source)

    def ordered_df(self) -> pd.DataFrame:
        """Columns in manifest order: path, ids, other metadata, then the labels."""
        first = [c for c in ("path", "patient_id", "image_id", "study_id", "view", "split") if c in self.df.columns]
        labels = [c for c in self.label_columns if c in self.df.columns]
        rest = [c for c in self.df.columns if c not in first and c not in labels]
        return self.df[first + rest + labels]

    def save(self, path: str | PathLike[str], fmt: Literal["csv", "parquet"] | None = None) -> Path:
        """Write CSV (.csv, .csv.gz) or Parquet (.parquet), by suffix unless `fmt` is given, atomically and
        with paths rebased to the file's folder, so `read_manifest(path)` finds the same images."""
        from chexfound.runio import atomic_write_bytes

        p = Path(path)
        fmt = fmt or ("parquet" if p.suffix == ".parquet" else "csv")
        df = self.rebased(p.parent).ordered_df()
        if fmt == "parquet":
            import io

            buf = io.BytesIO()
            try:
                df.to_parquet(buf, index=False)
            except ImportError as e:
                raise ManifestError(p, f"writing Parquet needs pyarrow ({e})") from e
            data = buf.getvalue()
        else:
            data = df.to_csv(index=False).encode()
            if p.suffix == ".gz":
                import gzip

                data = gzip.compress(data, mtime=0)
        atomic_write_bytes(p, data)
        return p

    def to_csv(self, path: str | PathLike[str]) -> None:
        self.save(path, "csv")

    def to_parquet(self, path: str | PathLike[str]) -> None:
        self.save(path, "parquet")

    def check_labels(self) -> None:
        """Raise ManifestError when a label column holds values other than 1/0/-1/blank."""
        for c in self.label_columns:
            v = pd.to_numeric(self.df[c], errors="coerce")
            bad_text = self.df[c].notna() & v.isna()
            bad_num = v.notna() & ~v.isin(list(_ALLOWED_LABEL_VALUES))
            if bad_text.any() or bad_num.any():
                row = int(np.flatnonzero((bad_text | bad_num).to_numpy())[0])
                value = self.df[c].iloc[row]
                value = value.item() if hasattr(value, "item") else value
                raise ManifestError(self.source, f"label column {c!r} has value {value!r} "
                                                 f"(row {row}); allowed: 1, 0, -1 (uncertain), blank")


def _patients_in_several_splits(df: pd.DataFrame) -> list[str]:
    n = df.groupby(df["patient_id"].astype(str))["split"].nunique()
    return list(n[n > 1].index)


def infer_label_columns(df: pd.DataFrame) -> list[str]:
    out = []
    for c in df.columns:
        if c in META_COLUMNS or str(c).startswith("Unnamed:"):
            continue
        v = pd.to_numeric(df[c], errors="coerce")
        if df[c].notna().sum() and v.notna().sum() != df[c].notna().sum():
            continue  # has non-numeric values
        if set(np.unique(v.dropna().to_numpy())) <= _ALLOWED_LABEL_VALUES:
            out.append(c)
    return out


def _read_table(p: Path) -> pd.DataFrame:
    if p.suffix == ".parquet":
        return pd.read_parquet(p)
    # ids stay text: "00000147" patient ids and "s5000..." study ids must not become numbers
    return pd.read_csv(p, dtype={"path": str, "patient_id": str, "image_id": str, "study_id": str, "view": str,
                                 "split": str, "patient_key": str})


def read_manifest(
    path: str | PathLike[str],
    root: str | PathLike[str] | None = None,
    labels: Sequence[str] | None = None,
    check_paths: bool = False,
) -> Manifest:
    """Read a CSV/Parquet manifest. `labels=None` infers label columns (numeric, values in {1, 0, -1});
    `check_paths=True` raises ManifestError listing files that do not exist."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(p, "manifest file not found")
    try:
        df = _read_table(p)
    except ImportError as e:
        raise ManifestError(p, f"reading Parquet needs pyarrow ({e})") from e
    except Exception as e:
        raise ManifestError(p, f"cannot parse manifest ({type(e).__name__}: {e})") from e
    if "path" not in df.columns:
        raise ManifestError(p, f"missing required column 'path' (columns: {list(df.columns)})")
    if "patient_id" not in df.columns:
        if "patient_key" in df.columns:
            df["patient_id"] = df["patient_key"]
        else:
            raise ManifestError(p, "missing required column 'patient_id' (needed for patient-level splits)")
    if df["path"].isna().any():
        raise ManifestError(p, f"{int(df['path'].isna().sum())} row(s) have an empty 'path'")
    if df["patient_id"].isna().any():
        row = int(np.flatnonzero(df["patient_id"].isna().to_numpy())[0])
        raise ManifestError(p, f"row {row} ({df['path'].iloc[row]}) has an empty 'patient_id'")
    if labels is None:
        label_cols = infer_label_columns(df)
    else:
        missing = [c for c in labels if c not in df.columns]
        if missing:
            raise ManifestError(p, f"missing label column(s) {missing}; available: {list(df.columns)}")
        label_cols = list(labels)
    m = Manifest(df.reset_index(drop=True), Path(root) if root else p.parent, label_cols, p)
    m.check_labels()
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
    if len(fractions) != len(names) or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError("fractions must be non-negative, match names and sum to 1")
    pats = np.asarray(patients).astype(str)
    uniq = np.unique(pats)
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    bounds = np.round(np.cumsum(fractions) * len(uniq)).astype(int)
    bounds[-1] = len(uniq)
    assign = {}
    start = 0
    for name, end in zip(names, bounds):
        for q in uniq[start:end]:
            assign[q] = name
        start = end
    return np.array([assign[q] for q in pats])
