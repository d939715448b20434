"""Score any model's predictions file against a labelled manifest (outside models on equal terms).

Predictions CSV (as `chexfound predict` writes it): an id column, `path` or `image_id`, then one probability
column per finding (or predict's JSON). Rows are matched to the manifest by `image_id` when both files have
it, else by `path`: first as written, then as resolved absolute paths (prediction paths relative to the
predictions file or to the working directory, manifest paths relative to its root), then by file name when
that is unique on both sides. Findings are
matched by name (tolerating spelling such as `Pleural_Thickening` / `Pleural Thickening`).
Every manifest row must have a prediction unless `allow_missing`; extra prediction rows are ignored and
counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from chexfound.data.manifest import Manifest
from chexfound.errors import ManifestError
from chexfound.data.findings import finding_map as map_findings

ID_COLUMNS = ("path", "image_id")


@dataclass
class Matched:
    y: np.ndarray                 # [N, C] labels (NaN = not labelled)
    p: np.ndarray                 # [N, C] probabilities
    patients: np.ndarray          # [N]
    findings: list[str]           # manifest names
    rows: np.ndarray              # manifest row index of each matched row
    ids: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    frame: pd.DataFrame | None = None  # the matched manifest rows (raw values, e.g. regression targets)


def read_predictions(path: str | PathLike[str]) -> pd.DataFrame:
    """A predictions CSV, or the JSON `chexfound predict --out preds.json` writes
    ({"predictions": [{"path": ..., "findings": [{"name": ..., "probability": ...}, ...]}, ...]})."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(p, "predictions file not found")
    if p.suffix.lower() == ".json":
        import json

        try:
            doc = json.loads(p.read_text())
            rows = [{"path": r["path"], **{f["name"]: f["probability"] for f in r["findings"]}}
                    for r in doc["predictions"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ManifestError(p, f"not a chexfound predictions JSON ({type(e).__name__}: {e})") from e
        return pd.DataFrame(rows)
    try:
        df = pd.read_csv(p)
    except Exception as e:
        raise ManifestError(p, f"cannot parse predictions CSV ({e})") from e
    if not any(c in df.columns for c in ID_COLUMNS):
        raise ManifestError(p, f"predictions need an id column 'path' or 'image_id'; columns: {list(df.columns)}")
    return df


def _norm_abs(values: Sequence[str], base: Path) -> list[str]:
    out = []
    for v in values:
        q = Path(str(v))
        out.append(str((q if q.is_absolute() else base / q).resolve()))
    return out


def match_predictions(
    preds: pd.DataFrame,
    manifest: Manifest,
    preds_source: Path | None = None,
    findings: Sequence[str] | None = None,
    id_column: str | None = None,
    allow_missing: bool = False,
    columns: Sequence[str] | None = None,
) -> Matched:
    """Align prediction rows to manifest rows. Probability columns are matched to `findings` (default: the
    manifest's label columns) by name; or, with `columns`, exactly those prediction columns are taken
    (e.g. a survival risk score) and `y` is left to the caller (NaN)."""
    src = preds_source
    mdf = manifest.df
    if id_column is None:
        id_column = "image_id" if ("image_id" in preds.columns and "image_id" in mdf.columns) else "path"
    if id_column not in preds.columns:
        raise ManifestError(src, f"predictions have no {id_column!r} column; columns: {list(preds.columns)}")
    if id_column not in mdf.columns:
        raise ManifestError(manifest.source, f"manifest has no {id_column!r} column to match predictions by")
    pid = preds[id_column].astype(str).tolist()
    dup = preds[id_column][preds[id_column].duplicated()].astype(str).tolist()
    if dup:
        raise ManifestError(src, f"{len(dup)} duplicated prediction id(s) in {id_column!r}, e.g. {dup[:3]}")

    # Findings: manifest label columns matched to prediction columns.
    prob_cols = [c for c in preds.columns if c not in ID_COLUMNS and pd.api.types.is_numeric_dtype(preds[c])]
    wanted = list(findings) if findings is not None else list(manifest.label_columns)
    if columns is not None:
        absent = [c for c in columns if c not in preds.columns]
        if absent:
            raise ManifestError(src, f"prediction column(s) {absent} missing; columns: {list(preds.columns)}")
        wanted = list(columns)
    elif findings is not None:
        absent = [f for f in wanted if f not in mdf.columns]
        if absent:
            raise ManifestError(manifest.source, f"label column(s) {absent} not in manifest")
    mapping = {c: c for c in wanted} if columns is not None else map_findings(wanted, prob_cols)
    if findings is not None and columns is None:
        missing = [f for f in wanted if f not in mapping]
        if missing:
            raise ManifestError(src, f"no probability column for finding(s) {missing}; columns: {prob_cols}")
    if not mapping:
        raise ManifestError(src, f"no probability column matches a manifest label {wanted}; columns: {prob_cols}")
    names = [f for f in wanted if f in mapping]

    # Rows.
    mid = mdf[id_column].astype(str).tolist()
    lookup = {v: i for i, v in enumerate(pid)}
    matched_by = "exact"
    pos = [lookup.get(v, -1) for v in mid]
    if id_column == "path" and any(q < 0 for q in pos):
        # Relative prediction paths: relative to the predictions file, or to the folder `predict` ran in.
        absm = _norm_abs(mid, manifest.root)
        for base in ([src.parent] if src is not None else []) + [Path.cwd()]:
            lk = {v: i for i, v in enumerate(_norm_abs(pid, base))}
            pos2 = [q if q >= 0 else lk.get(a, -1) for q, a in zip(pos, absm)]
            if sum(q >= 0 for q in pos2) > sum(q >= 0 for q in pos):
                pos, matched_by = pos2, "absolute path"
        if any(q < 0 for q in pos):
            pn = [Path(v).name for v in pid]
            mn = [Path(v).name for v in mid]
            if len(set(pn)) == len(pn) and len(set(mn)) == len(mn):
                lk2 = {v: i for i, v in enumerate(pn)}
                pos3 = [q if q >= 0 else lk2.get(n, -1) for q, n in zip(pos, mn)]
                if sum(q >= 0 for q in pos3) > sum(q >= 0 for q in pos):
                    pos, matched_by = pos3, "file name"
    pos_arr = np.array(pos)
    missing_rows = np.flatnonzero(pos_arr < 0)
    if missing_rows.size and not allow_missing:
        ex = [mid[i] for i in missing_rows[:3]]
        raise ManifestError(src, f"{missing_rows.size} of {len(mid)} manifest row(s) have no prediction "
                                 f"(matched by {id_column}), e.g. {ex}; use --allow-missing to score the rest")
    rows = np.flatnonzero(pos_arr >= 0)
    if rows.size == 0:
        raise ManifestError(src, f"no prediction row matches the manifest by {id_column!r}")
    take = pos_arr[rows]
    p = preds[[mapping[f] for f in names]].to_numpy(dtype=np.float64)[take]
    bad = ~np.isfinite(p)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ManifestError(src, f"{int(bad.sum())} missing/non-finite probabilities, e.g. row "
                                 f"{pid[take[r]]!r} column {mapping[names[c]]!r}")
    sub = manifest.subset(np.isin(np.arange(len(mdf)), rows))
    if columns is None:
        sub.label_columns = names
        y = sub.labels()
    else:
        y = np.full(p.shape, np.nan, dtype=np.float32)
    info = {"id_column": id_column, "matched_by": matched_by, "n_manifest_rows": len(mid),
            "n_matched": int(rows.size), "n_missing": int(missing_rows.size),
            "n_extra_predictions": int(len(pid) - len(set(take.tolist()))),
            "finding_columns": {f: mapping[f] for f in names}}
    return Matched(y, p, sub.patients(), names, rows, [mid[i] for i in rows], info, sub.df)


def read_thresholds(path: str | PathLike[str], findings: Sequence[str]) -> np.ndarray:
    """Thresholds from a JSON {finding: t} / {"thresholds": {...}} or a head file's metadata."""
    import json

    p = Path(path)
    if not p.is_file():
        raise ManifestError(p, "thresholds file not found")
    if p.suffix == ".safetensors":
        from chexfound.models.format import read_meta

        meta = read_meta(p)
        d = dict(zip(meta.get("findings", []), meta.get("thresholds", [])))
    else:
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(p, f"not valid JSON ({e})") from e
        d = d.get("thresholds", d)
    m = map_findings(findings, list(d))
    missing = [f for f in findings if f not in m]
    if missing:
        raise ManifestError(p, f"no threshold for finding(s) {missing}")
    return np.array([float("nan") if d[m[f]] is None else float(d[m[f]]) for f in findings])  # None: no call


def recorded_thresholds(predictions: str | PathLike[str], findings: Sequence[str]) -> tuple[np.ndarray, Path] | None:
    """The thresholds `chexfound predict` recorded beside its output (`preds.run.json` next to `preds.csv`), in
    the order of `findings`; NaN for a finding predict made no call for (no threshold, or uninformative). None
    when there is no run record (another model's file)."""
    import json

    p = Path(predictions)
    run = p.with_name(f"{p.stem}.run.json")
    if not run.is_file():
        return None
    try:
        doc = json.loads(run.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(run, f"unreadable run record ({e})") from e
    pol = doc.get("finding_policy")
    if pol:
        d = {r["name"]: (r["threshold"] if r.get("called", True) and r["threshold"] is not None else float("nan"))
             for r in pol["findings"]}
    else:  # older records: the model's thresholds as predict reported them
        model = doc.get("model") or {}
        d = {n: (float("nan") if t is None else t) for n, t in zip(model.get("findings", []),
                                                                  model.get("thresholds", []))}
    if not d:
        return None
    m = map_findings(findings, list(d))
    missing = [f for f in findings if f not in m]
    if missing:
        raise ManifestError(run, f"records no threshold for finding(s) {missing}")
    return np.array([float(d[m[f]]) for f in findings]), run
