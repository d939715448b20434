"""Scoring for the non-multilabel task types (multiclass, regression, survival), with patient-level CIs.

Each returns a metrics dict that still carries the common "macro"/"per_finding" keys of every metrics.json:
multiclass fills them with one-vs-rest AUROC/AP per class; regression and survival have no ranking metric per
finding, so their "macro" AUROC/AP are null and the task's own numbers sit under "regression"/"survival".
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from chexfound.stats import bootstrap_statistic, concordance_index, multiclass_metrics, regression_metrics
from chexfound.evaluate.protocols.common import EvalConfig, score_predictions


def class_index(onehot: np.ndarray) -> np.ndarray:
    """One-hot (or multi-hot with NaN) rows -> class index; NaN unless exactly one class is 1."""
    y = np.asarray(onehot, dtype=np.float64)
    one = np.nansum(y == 1, axis=1) == 1
    idx = np.where(one, np.nanargmax(np.nan_to_num(y, nan=-1.0), axis=1), -1).astype(np.float64)
    idx[~one] = np.nan
    return idx


def score_multiclass(y_idx: np.ndarray, prob: np.ndarray, classes: Sequence[str], patients: np.ndarray,
                     cfg: EvalConfig, y_train_idx: np.ndarray | None = None) -> dict[str, Any]:
    y_idx = np.asarray(y_idx, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    k = len(classes)
    onehot = np.full((len(y_idx), k), np.nan)
    ok = ~np.isnan(y_idx)
    onehot[ok] = np.eye(k)[y_idx[ok].astype(int)]
    y_train = None
    if y_train_idx is not None:
        t = np.asarray(y_train_idx, dtype=np.float64)
        y_train = np.full((len(t), k), np.nan)
        y_train[~np.isnan(t)] = np.eye(k)[t[~np.isnan(t)].astype(int)]
    out = score_predictions(onehot, prob, patients, classes, None, y_train, cfg)
    mc = multiclass_metrics(y_idx, prob, classes)
    if cfg.bootstrap.n_boot > 0:
        rows = np.flatnonzero(ok)
        for key in ("accuracy", "balanced_accuracy"):
            mc[f"{key}_ci"] = bootstrap_statistic(
                lambda i, key=key: multiclass_metrics(y_idx[rows][i], prob[rows][i], classes)[key],
                rows.size, np.asarray(patients)[rows], cfg.bootstrap)["ci"]
    out["multiclass"] = mc
    out["rule"]["text"] += "; per class one-vs-rest"
    return out


def _null_core(names: Sequence[str]) -> dict[str, Any]:
    nan = float("nan")
    return {"macro": {"auroc": nan, "ap": nan, "n_findings": 0},
            "per_finding": {n: {"auroc": nan, "ap": nan, "auroc_ci": [nan, nan], "n_pos": None} for n in names}}


def score_regression(y: np.ndarray, pred: np.ndarray, targets: Sequence[str], patients: np.ndarray,
                     cfg: EvalConfig) -> dict[str, Any]:
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    pred = np.asarray(pred, dtype=np.float64).reshape(len(pred), -1)
    per: dict[str, Any] = {}
    for j, t in enumerate(targets):
        r = regression_metrics(y[:, j], pred[:, j])
        if cfg.bootstrap.n_boot > 0 and r["n"] > 1:
            for key in ("mae", "r2"):
                r[f"{key}_ci"] = bootstrap_statistic(
                    lambda i, key=key, j=j: regression_metrics(y[i, j], pred[i, j])[key], len(y), patients,
                    cfg.bootstrap)["ci"]
        per[t] = r
    return {**_null_core(targets), "regression": per}


def score_survival(time: np.ndarray, event: np.ndarray, risk: np.ndarray, patients: np.ndarray,
                   cfg: EvalConfig) -> dict[str, Any]:
    c = concordance_index(time, event, risk)
    if cfg.bootstrap.n_boot > 0:
        t, e, r = (np.asarray(v, dtype=np.float64).ravel() for v in (time, event, risk))
        c["c_index_ci"] = bootstrap_statistic(lambda i: concordance_index(t[i], e[i], r[i])["c_index"], len(t),
                                              patients, cfg.bootstrap)["ci"]
    return {**_null_core([]), "survival": c}
