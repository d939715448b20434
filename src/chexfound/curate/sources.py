"""List every image of every source as one item table (before any decoding).

Columns: key ("<source>/<relative path>", unique), source, namespace, source_index (order in the spec),
path (absolute file), rel_path, patient_raw, patient_id ("<namespace>:<id>"), image_id, view, age,
modality, sex, study_id, split.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from chexfound.curate.spec import CorpusSpec, SourceSpec
from chexfound.errors import ConfigError, ManifestError

ITEM_COLUMNS = ["key", "source", "namespace", "source_index", "path", "rel_path", "patient_raw", "patient_id",
                "image_id", "view", "age", "modality", "sex", "study_id", "split"]
_DEFAULTS = {
    "view": ("view", "ViewPosition", "view_position", "Projection", "AP/PA"),
    "age": ("age", "PatientAge", "patient_age", "Age"),
    "modality": ("modality", "Modality"),
    "sex": ("sex", "PatientSex", "Sex", "gender"),
    "study_id": ("study_id", "StudyInstanceUID", "study"),
    "split": ("split",),
}


def _pick(df: pd.DataFrame, explicit: str | None, candidates: tuple[str, ...], src: SourceSpec, what: str,
          where: Path | None) -> pd.Series:
    if explicit:
        if explicit not in df.columns:
            raise ManifestError(where, f"source {src.name}: {what} column {explicit!r} not found "
                                       f"(columns: {list(df.columns)})")
        return df[explicit]
    for c in candidates:
        if c in df.columns:
            return df[c]
    return pd.Series([None] * len(df), index=df.index, dtype=object)


def _from_table(df: pd.DataFrame, base: Path, src: SourceSpec, where: Path | None) -> pd.DataFrame:
    if src.path_column not in df.columns:
        raise ManifestError(where, f"source {src.name}: no {src.path_column!r} column (columns: {list(df.columns)})")
    if src.patient_column:
        pat = _pick(df, src.patient_column, (), src, "patient", where)
    elif "patient_id" in df.columns:
        pat = df["patient_id"]
    elif "patient_key" in df.columns:
        pat = df["patient_key"]
    else:
        raise ManifestError(where, f"source {src.name}: no patient column (set patient_column; "
                                   f"columns: {list(df.columns)})")
    paths = [Path(str(p)) for p in df[src.path_column]]
    abs_paths = [p if p.is_absolute() else base / p for p in paths]
    rel = [_rel(p, base) for p in abs_paths]
    out = pd.DataFrame({
        "path": [str(p) for p in abs_paths],
        "rel_path": rel,
        "patient_raw": pat.astype(str).str.strip().to_numpy(),
        "image_id": _pick(df, src.image_id_column, ("image_id",), src, "image id", where).to_numpy(),
    })
    for col, cands in _DEFAULTS.items():
        explicit = getattr(src, f"{col}_column", None)
        out[col] = _pick(df, explicit, cands, src, col, where).to_numpy()
    if pat.isna().any():
        bad = df.loc[pat.isna().to_numpy(), src.path_column].head(3).tolist()
        raise ManifestError(where, f"source {src.name}: {int(pat.isna().sum())} row(s) without a patient id, "
                                   f"e.g. {bad}")
    return out


def _rel(p: Path, base: Path) -> str:
    try:
        return p.relative_to(base).as_posix()
    except ValueError:  # outside the root: keep a unique, readable relative name
        return "_abs/" + p.as_posix().lstrip("/")


def _list_folder(src: SourceSpec, skip: tuple[Path, ...] = ()) -> pd.DataFrame:
    root = Path(src.root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in src.extensions
                   and not any(p.is_relative_to(s) for s in skip))
    rel = [p.relative_to(root).as_posix() for p in files]
    if src.patient_regex:
        rx = re.compile(src.patient_regex)
        pats = []
        for r in rel:
            m = rx.search(r)
            if not m:
                raise ConfigError(None, f"source {src.name}: patient_regex {src.patient_regex!r} does not match {r!r}")
            pats.append(m.group(1) if m.groups() else m.group(0))
    else:
        # no patient information: every image is its own "patient" (its path without the extension)
        pats = [str(Path(r).with_suffix("")) for r in rel]
    out = pd.DataFrame({"path": [str(p) for p in files], "rel_path": rel, "patient_raw": pats,
                        "image_id": [Path(r).name for r in rel]})
    for col in _DEFAULTS:
        out[col] = None
    return out


def list_source(src: SourceSpec, skip: tuple[Path, ...] = ()) -> pd.DataFrame:
    """`skip`: folders never listed (the run's own output folder, should it sit inside a source root)."""
    root = Path(src.root)
    if not root.is_dir():
        raise ConfigError(None, f"source {src.name}: root folder {root} does not exist")
    if src.format == "folder":
        df = _list_folder(src, skip)
    elif src.format == "manifest":
        name = src.manifest or next((n for n in ("labels.csv", "manifest.csv") if (root / n).is_file()), None)
        if name is None:
            raise ManifestError(root, f"source {src.name}: no manifest given and no labels.csv/manifest.csv in root")
        mpath = Path(name) if Path(name).is_absolute() else root / name
        if not mpath.is_file():
            raise ManifestError(mpath, f"source {src.name}: manifest file not found")
        try:
            raw = pd.read_parquet(mpath) if mpath.suffix == ".parquet" else pd.read_csv(mpath, dtype=str,
                                                                                         keep_default_na=False,
                                                                                         na_values=[""])
        except Exception as e:
            raise ManifestError(mpath, f"cannot parse manifest ({e})") from e
        df = _from_table(raw, root, src, mpath)
    else:
        from chexfound.data import readers

        fn = getattr(readers, f"read_{src.format}", None)
        if fn is None:
            known = ["manifest", "folder"] + sorted(n[5:] for n in dir(readers) if n.startswith("read_"))
            raise ConfigError(None, f"source {src.name}: unknown format {src.format!r}; known: {known}")
        m = fn(root)
        df = _from_table(m.df, Path(m.root), src, m.source)
    if src.limit is not None:
        df = df.head(int(src.limit))
    df = df.reset_index(drop=True)
    df.insert(0, "key", [f"{src.name}/{r}" for r in df["rel_path"]])
    df.insert(1, "source", src.name)
    df.insert(2, "namespace", src.namespace)
    df["patient_id"] = [f"{src.namespace}:{p}" for p in df["patient_raw"]]
    if df["key"].duplicated().any():
        dups = df.loc[df["key"].duplicated(), "rel_path"].head(3).tolist()
        raise ManifestError(None, f"source {src.name}: the same file is listed twice, e.g. {dups}")
    return df


def list_items(spec: CorpusSpec, skip: tuple[Path, ...] = ()) -> pd.DataFrame:
    frames = []
    for k, src in enumerate(spec.sources):
        df = list_source(src, skip)
        df.insert(3, "source_index", k)
        frames.append(df)
    items = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ITEM_COLUMNS)
    items["source_index"] = items["source_index"].astype(np.int64)
    return items[ITEM_COLUMNS]
