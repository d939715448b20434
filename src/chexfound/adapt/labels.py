"""Train and validation manifests of an adapt run (--val, a `split` column, or a patient split) and the label
arrays of each task (multilabel, binary, multiclass, regression, survival)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from chexfound.adapt.options import AdaptOptions
from chexfound.errors import ConfigError, ManifestError

VAL_SPLIT_NAMES = ("val", "valid", "validation")


def _read(path: str, labels: Sequence[str] | None, task: str):
    """Binary label columns are validated by read_manifest; class names, values and times are not 0/1/-1."""
    from chexfound.data.manifest import read_manifest

    if task in ("multilabel", "binary"):
        return read_manifest(path, labels=labels)
    if not labels:
        raise ConfigError(None, f"a {task} task needs --labels (they cannot be inferred)")
    m = read_manifest(path, labels=[])
    missing = [c for c in labels if c not in m.df.columns]
    if missing:
        raise ManifestError(path, f"missing label column(s) {missing}; available: {list(m.df.columns)}")
    m.label_columns = list(labels)
    return m


def split_manifests(opts: AdaptOptions):
    """(train manifest, val manifest) following --val, a `split` column, or a patient split of --train."""
    from chexfound.data.manifest import patient_split

    train = _read(opts.train, opts.labels, opts.task)
    if opts.val:
        return train, _read(opts.val, train.label_columns, opts.task)
    if "split" in train.df.columns:
        split = train.df["split"].astype(str).str.lower()
        val_mask = split.isin(VAL_SPLIT_NAMES).to_numpy()
        train_mask = (split == "train").to_numpy()
        if val_mask.any():
            return train.subset(train_mask), train.subset(val_mask)
        if train_mask.any():
            train = train.subset(train_mask)
    if not 0 < opts.val_split < 1:
        raise ConfigError(None, "no validation manifest or split: set --val-split between 0 and 1")
    names = patient_split(train.patients(), (1 - opts.val_split, opts.val_split), ("train", "val"), seed=opts.seed)
    return train.subset(names == "train"), train.subset(names == "val")


def task_labels(m: Any, task: str, uncertain: str, classes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(label array for fit_heads, finding/class names) from a manifest's label columns."""
    cols = list(m.label_columns)
    if not cols:
        raise ManifestError(m.source, "no label columns (pass --labels)")
    if task == "multilabel":
        return m.labels(uncertain), cols
    if task == "binary":
        if len(cols) != 1:
            raise ManifestError(m.source, f"a binary task takes one label column, got {cols}")
        return m.labels(uncertain), cols
    if task == "multiclass":
        if len(cols) == 1:  # one column of class names/ids
            raw = m.df[cols[0]]
            names = classes or sorted(raw.dropna().astype(str).unique().tolist())
            if len(names) < 2:
                raise ManifestError(m.source, f"column {cols[0]!r} holds {len(names)} class(es) {names}; "
                                              "a multiclass task needs at least two")
            lut = {n: i for i, n in enumerate(names)}
            y = np.array([lut.get(str(v), np.nan) if pd.notna(v) else np.nan for v in raw], dtype=np.float32)
            return y, names
        onehot = m.labels(uncertain)  # one 0/1 column per class
        y = np.where(np.nansum(onehot == 1, 1) == 1, np.nanargmax(np.nan_to_num(onehot, nan=-1), 1), np.nan)
        return y.astype(np.float32), cols
    numeric = m.df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
    if task == "regression":
        return numeric, cols
    if task == "survival":
        if len(cols) != 2:
            raise ManifestError(m.source, f"a survival task takes two label columns (time, event), got {cols}")
        return numeric, ["risk"]
    raise ConfigError(None, f"unknown task {task!r}")
