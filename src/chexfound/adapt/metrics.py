"""Validation metrics for model selection and the per-finding table (sklearn; the evaluate stage adds CIs).

Every metric ignores unlabelled (NaN) entries; a class enters the macro means only when validation has both
positives and negatives for it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

LOWER_IS_BETTER = frozenset({"mse", "mae", "loss"})
DEFAULT_METRIC = {"multilabel": "macro_ap", "binary": "macro_ap", "multiclass": "macro_ap",
                  "regression": "r2", "survival": "c_index"}


TASK_METRICS = {"multilabel": ("macro_ap", "macro_auroc"), "binary": ("macro_ap", "macro_auroc"),
                "multiclass": ("macro_ap", "macro_auroc", "accuracy", "balanced_accuracy"),
                "regression": ("r2", "mse", "mae"), "survival": ("c_index",)}


def check_metric(task: str, metric: str) -> None:
    if metric not in TASK_METRICS.get(task, ()):
        raise ValueError(f"selection metric {metric!r} does not exist for a {task} task; use one of "
                         f"{TASK_METRICS.get(task)}")


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def per_finding(y: np.ndarray, p: np.ndarray, findings: Sequence[str]) -> list[dict[str, Any]]:
    """AUROC/AP per column of multilabel targets y [N, C] (NaN = unlabelled) and scores p [N, C]."""
    rows = []
    for c, name in enumerate(findings):
        m = ~np.isnan(y[:, c]) & ~np.isnan(p[:, c])
        yc, pc = y[m, c], p[m, c]
        n_pos, n_neg = int((yc == 1).sum()), int((yc == 0).sum())
        auroc = ap = math.nan
        if n_pos and n_neg:
            auroc = float(roc_auc_score(yc, pc))
            ap = float(average_precision_score(yc, pc))
        rows.append({"finding": name, "n_pos": n_pos, "n_neg": n_neg, "auroc": auroc, "ap": ap,
                     "prevalence": n_pos / max(n_pos + n_neg, 1)})
    return rows


def _nanmean(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: over pairs with t_i < t_j and event_i, the share where risk_i > risk_j (ties count 1/2)."""
    t, e, r = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (time, event, risk))
    keep = ~(np.isnan(t) | np.isnan(e) | np.isnan(r))
    t, e, r = t[keep], e[keep], r[keep]
    num = den = 0.0
    for i in np.flatnonzero(e == 1):
        later = t > t[i]
        den += later.sum()
        num += (r[i] > r[later]).sum() + 0.5 * (r[i] == r[later]).sum()
    return float(num / den) if den else math.nan


def task_metrics(task: str, y: np.ndarray, p: np.ndarray, findings: Sequence[str]) -> dict[str, Any]:
    """Scalar metrics of one set of predictions (p: probabilities, regression values or risk scores)."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if task in ("multilabel", "binary"):
            y2, p2 = y.reshape(len(y), -1), p.reshape(len(p), -1)
            rows = per_finding(y2, p2, findings)
            return {"macro_ap": _nanmean([r["ap"] for r in rows]), "macro_auroc": _nanmean([r["auroc"] for r in rows]),
                    "n_scored": sum(not math.isnan(r["ap"]) for r in rows)}
        if task == "multiclass":
            t = y.reshape(-1)
            m = ~np.isnan(t)
            t, pm = t[m].astype(int), p[m]
            onehot = np.eye(p.shape[1])[t] if len(t) else np.zeros((0, p.shape[1]))
            rows = per_finding(onehot, pm, findings)
            pred = pm.argmax(1) if len(t) else np.zeros(0, int)
            recalls = [float((pred[t == c] == c).mean()) for c in range(p.shape[1]) if (t == c).any()]
            return {"accuracy": float((pred == t).mean()) if len(t) else math.nan,
                    "balanced_accuracy": _nanmean(recalls),
                    "macro_ap": _nanmean([r["ap"] for r in rows]), "macro_auroc": _nanmean([r["auroc"] for r in rows])}
        if task == "regression":
            y2, p2 = y.reshape(len(y), -1), p.reshape(len(p), -1)
            mse, mae, r2 = [], [], []
            for k in range(y2.shape[1]):
                m = ~np.isnan(y2[:, k])
                if not m.any():
                    continue
                err = p2[m, k] - y2[m, k]
                mse.append(float((err**2).mean()))
                mae.append(float(np.abs(err).mean()))
                var = float(y2[m, k].var())
                r2.append(1 - mse[-1] / var if var > 0 else math.nan)
            return {"mse": _nanmean(mse), "mae": _nanmean(mae), "r2": _nanmean(r2)}
        if task == "survival":
            return {"c_index": concordance_index(y[:, 0], y[:, 1], p.reshape(len(p), -1)[:, 0])}
    raise ValueError(f"unknown task {task!r}")


def choose_thresholds(y: np.ndarray, p: np.ndarray, method: str = "f1") -> np.ndarray:
    """Per-class decision thresholds on validation: max F1 ("f1") or Youden's J ("youden"); 0.5 for a class
    without both positives and negatives."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    out = np.full(y.shape[1], 0.5)
    for c in range(y.shape[1]):
        m = ~np.isnan(y[:, c]) & ~np.isnan(p[:, c])
        yc, pc = y[m, c], p[m, c]
        if not ((yc == 1).any() and (yc == 0).any()):
            continue
        if method == "f1":
            prec, rec, thr = precision_recall_curve(yc, pc)
            f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
            out[c] = thr[int(np.argmax(f1))]
        elif method == "youden":
            fpr, tpr, thr = roc_curve(yc, pc)
            j = int(np.argmax(tpr - fpr))
            out[c] = min(float(thr[j]), 1.0)
        else:
            raise ValueError(f"unknown threshold method {method!r}; use f1 or youden")
    return out
