"""Multiclass metrics: accuracy, balanced accuracy, one-vs-rest AUROC per class."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from chexfound.stats.ranking import RankedScores


def multiclass_metrics(y: np.ndarray, prob: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy and one-vs-rest AUROC per class + macro (classes with both outcomes).

    y: [N] integer class index (NaN = unlabelled); prob: [N, K] class probabilities.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    prob = np.asarray(prob, dtype=np.float64)
    prob = prob[:, None] if prob.ndim == 1 else prob
    m = ~np.isnan(y)
    yi = y[m].astype(int)
    pr = prob[m]
    if pr.shape[1] != len(classes):
        raise ValueError(f"{pr.shape[1]} probability columns for {len(classes)} classes")
    pred = pr.argmax(axis=1)
    per: dict[str, dict[str, Any]] = {}
    recalls = []
    for k, name in enumerate(classes):
        yk = (yi == k).astype(np.float64)
        n_pos = int(yk.sum())
        auc = float(RankedScores(yk, pr[:, k]).auroc_ap()[0][0]) if 0 < n_pos < yk.size else float("nan")
        rec = float(np.mean(pred[yi == k] == k)) if n_pos else float("nan")
        if n_pos:
            recalls.append(rec)
        per[name] = {"n_pos": n_pos, "auroc": auc, "recall": rec}
    aucs = [v["auroc"] for v in per.values() if not np.isnan(v["auroc"])]
    return {
        "n": int(yi.size),
        "accuracy": float(np.mean(pred == yi)) if yi.size else float("nan"),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
        "macro": {"auroc": float(np.mean(aucs)) if aucs else float("nan")},
        "per_class": per,
    }
