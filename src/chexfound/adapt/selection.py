"""Model selection: which validation metric picks the best head of a grid, and its value for one prediction set.

The numbers come from the statistics layer (`chexfound.stats`: AUROC/AP, regression, C-index); this module
only says which metric a task selects on and how it aggregates. Every metric ignores unlabelled (NaN)
entries; a class enters the macro means only when validation has both positives and negatives for it.
Decision thresholds are chosen by `chexfound.stats.thresholds`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from chexfound.stats import concordance_index, regression_metrics
from chexfound.stats.ranking import auroc_ap_masked

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
        auroc, ap = auroc_ap_masked(yc, pc)
        rows.append({"finding": name, "n_pos": n_pos, "n_neg": n_neg, "auroc": auroc, "ap": ap,
                     "prevalence": n_pos / max(n_pos + n_neg, 1)})
    return rows


def _nanmean(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def task_metrics(task: str, y: np.ndarray, p: np.ndarray, findings: Sequence[str]) -> dict[str, Any]:
    """Scalar metrics of one set of predictions (p: probabilities, regression values or risk scores)."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if task in ("multilabel", "binary"):
        rows = per_finding(y.reshape(len(y), -1), p.reshape(len(p), -1), findings)
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
        per = [(k, regression_metrics(y2[:, k], p2[:, k])) for k in range(y2.shape[1])]
        per = [(k, r) for k, r in per if r["n"]]
        # A constant validation target says nothing about the ranking of configs: its R^2 does not count.
        r2 = [r["r2"] if np.nanvar(y2[:, k]) > 0 else math.nan for k, r in per]
        per = [r for _, r in per]
        return {"mse": _nanmean([r["rmse"] ** 2 for r in per]), "mae": _nanmean([r["mae"] for r in per]),
                "r2": _nanmean(r2)}
    if task == "survival":
        return {"c_index": concordance_index(y[:, 0], y[:, 1], p.reshape(len(p), -1)[:, 0])["c_index"]}
    raise ValueError(f"unknown task {task!r}")
