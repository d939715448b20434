"""Multi-label point metrics (AUROC, AP, calls at a threshold) with NaN-masked labels.

Multi-label rule (stated once, used everywhere): a finding is *eligible* for AUROC/AP and for the macro and
micro means when its labelled test images include at least `min_pos` positives and `min_neg` negatives
(default 1 and 1: the smallest counts for which AUROC is defined). Ineligible findings are still listed in
`per_finding` with their counts and NaN metrics, and named in `excluded`. Labels are 1/0; NaN means "not
labelled" and drops that (image, finding) pair only.

macro = unweighted mean over eligible findings; micro = the metric on all eligible (image, finding) pairs
pooled (scikit-learn's average="micro").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from chexfound.stats.ranking import RankedScores, average_precision, binary_auroc  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class EligibilityRule:
    min_pos: int = 1
    min_neg: int = 1

    def ok(self, n_pos: int, n_neg: int) -> bool:
        """Whether a finding with these label counts is scored."""
        return n_pos >= self.min_pos and n_neg >= self.min_neg

    def describe(self) -> str:
        """The rule in words (what reports print)."""
        return (f"findings with >= {self.min_pos} positive(s) and >= {self.min_neg} negative(s) among labelled "
                "test images; macro = unweighted mean over them, micro = pooled pairs")


def _as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def threshold_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, precision (PPV), NPV, F1 and accuracy of `s >= threshold` (NaN labels masked).

    A ratio with an empty denominator is NaN (e.g. specificity without negatives).
    """
    y, s = np.asarray(y, dtype=np.float64).ravel(), np.asarray(s, dtype=np.float64).ravel()
    m = ~np.isnan(y)
    if not np.isfinite(threshold):  # no threshold: the finding is never called, so calls have no metrics
        nan = float("nan")
        return {"threshold": nan, "sensitivity": nan, "specificity": nan, "precision": nan, "npv": nan, "f1": nan,
                "accuracy": nan, "tp": nan, "fp": nan, "fn": nan, "tn": nan}
    y, pred = y[m] == 1, s[m] >= threshold
    tp = float(np.sum(y & pred))
    fp = float(np.sum(~y & pred))
    fn = float(np.sum(y & ~pred))
    tn = float(np.sum(~y & ~pred))

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    return {
        "threshold": float(threshold),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "precision": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        # F1 is defined (0) when there are positives but no predicted positives; NaN only when both are empty.
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": ratio(tp + tn, tp + tn + fp + fn),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def multilabel_metrics(
    y: np.ndarray,
    p: np.ndarray,
    findings: Sequence[str],
    thresholds: Sequence[float] | np.ndarray | None = None,
    rule: EligibilityRule = EligibilityRule(),
) -> dict[str, Any]:
    """Per-finding AUROC/AP/threshold metrics and macro/micro means. y: [N, C] 1/0/NaN; p: [N, C] scores."""
    y, p = _as_2d(y), _as_2d(p)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} differ in shape")
    if y.shape[1] != len(findings):
        raise ValueError(f"{y.shape[1]} label columns for {len(findings)} findings")
    thr = np.full(len(findings), 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    per: dict[str, dict[str, Any]] = {}
    eligible: list[int] = []
    for c, name in enumerate(findings):
        m = ~np.isnan(y[:, c])
        n_pos = int(np.sum(y[m, c] == 1))
        n_neg = int(np.sum(y[m, c] == 0))
        entry: dict[str, Any] = {"n": int(m.sum()), "n_pos": n_pos, "n_neg": n_neg,
                                 "prevalence": n_pos / max(1, n_pos + n_neg)}
        if rule.ok(n_pos, n_neg):
            eligible.append(c)
            auc, ap = RankedScores(y[m, c], p[m, c]).auroc_ap()
            entry.update(auroc=float(auc[0]), ap=float(ap[0]), eligible=True)
        else:
            entry.update(auroc=float("nan"), ap=float("nan"), eligible=False)
        entry.update({k: v for k, v in threshold_metrics(y[:, c], p[:, c], thr[c]).items()})
        per[name] = entry
    out: dict[str, Any] = {
        "per_finding": per,
        "eligible": [findings[c] for c in eligible],
        "excluded": [f for i, f in enumerate(findings) if i not in eligible],
        "rule": {"min_pos": rule.min_pos, "min_neg": rule.min_neg, "text": rule.describe()},
        "macro": macro_of(per, [findings[c] for c in eligible]),
        "micro": micro_metrics(y[:, eligible], p[:, eligible]) if eligible else {"auroc": float("nan"),
                                                                               "ap": float("nan")},
        "n_images": int(y.shape[0]),
    }
    return out


_MACRO_KEYS = ("auroc", "ap", "f1", "sensitivity", "specificity")


def macro_of(per: dict[str, dict[str, Any]], names: Sequence[str]) -> dict[str, float]:
    """Unweighted mean over `names` (NaN-skipping for threshold metrics; NaN if `names` is empty)."""
    out: dict[str, float] = {"n_findings": len(names)}
    for k in _MACRO_KEYS:
        vals = np.array([per[n][k] for n in names], dtype=np.float64)
        out[k] = float(np.nanmean(vals)) if vals.size and not np.all(np.isnan(vals)) else float("nan")
    return out


def micro_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    y, p = _as_2d(y), _as_2d(p)
    m = ~np.isnan(y)
    auc, ap = RankedScores(y[m], p[m]).auroc_ap()
    return {"auroc": float(auc[0]), "ap": float(ap[0])}
