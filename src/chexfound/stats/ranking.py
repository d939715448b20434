"""AUROC and average precision: one ranking engine for point values and every bootstrap resample.

The bootstrap needs the same two ranking metrics on hundreds of resamples. A patient-level resample is
equivalent to giving every image an integer weight (how often its patient was drawn), and the sort order
of the scores does not change between resamples. So the scores are sorted and grouped into ties once,
and each resample only costs a few cumulative sums over a [B, n] weight matrix.

Definitions match scikit-learn (tested): AUROC is the trapezoidal area under the ROC curve, i.e. the
Mann-Whitney probability that a positive outscores a negative with ties counting 1/2; average precision is
sum_k (R_k - R_{k-1}) P_k over distinct score thresholds (no interpolation), as `average_precision_score`.
"""

from __future__ import annotations

import numpy as np


class RankedScores:
    """Scores + binary labels (no NaN), sorted once; evaluates metrics for weight matrices [B, n]."""

    def __init__(self, y: np.ndarray, s: np.ndarray) -> None:
        y = np.asarray(y, dtype=np.float64).ravel()
        s = np.asarray(s, dtype=np.float64).ravel()
        if y.shape != s.shape:
            raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
        if not np.all(np.isfinite(s)):
            raise ValueError("scores contain NaN or inf")
        if y.size and not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be 0/1 (mask NaN before ranking)")
        self.n = y.size
        # Descending order; stable so equal scores keep input order (irrelevant after tie grouping).
        self.order = np.argsort(-s, kind="stable")
        ys = y[self.order]
        ss = s[self.order]
        self.pos = ys
        # Start index of every tie group in the sorted order.
        if self.n:
            new = np.r_[True, ss[1:] != ss[:-1]]
            self.starts = np.flatnonzero(new)
        else:
            self.starts = np.zeros(0, dtype=np.int64)

    def _group_sums(self, ws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ws [B, n] in *sorted* order -> (positive weight, negative weight) per tie group, [B, G] descending."""
        pw = ws * self.pos
        nw = ws - pw
        if self.starts.size == 0:
            z = np.zeros((ws.shape[0], 0))
            return z, z
        return np.add.reduceat(pw, self.starts, axis=1), np.add.reduceat(nw, self.starts, axis=1)

    def auroc_ap(self, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """AUROC and AP for each weight row (NaN where a row has no positive or no negative weight)."""
        if w is None:
            w = np.ones((1, self.n))
        w = np.atleast_2d(np.asarray(w, dtype=np.float64))
        return self.auroc_ap_sorted(w[:, self.order])

    def auroc_ap_sorted(self, ws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As `auroc_ap`, for weights already gathered into `self.order` (saves a copy in the bootstrap)."""
        pg, ng = self._group_sums(ws)
        ptot = pg.sum(axis=1)
        ntot = ng.sum(axis=1)
        # AUROC: for each group (descending), positives beat all negatives in later (lower) groups,
        # tie with the negatives of their own group.
        neg_below = ntot[:, None] - np.cumsum(ng, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            auroc = (pg * (neg_below + 0.5 * ng)).sum(axis=1) / (ptot * ntot)
            tp = np.cumsum(pg, axis=1)
            fp = np.cumsum(ng, axis=1)
            denom = tp + fp
            prec = np.where(denom > 0, tp / np.where(denom > 0, denom, 1.0), 0.0)
            ap = (pg * prec).sum(axis=1) / ptot
        bad_auc = (ptot <= 0) | (ntot <= 0)
        auroc[bad_auc] = np.nan
        ap[ptot <= 0] = np.nan
        # AP needs negatives to be meaningful as a ranking metric; follow the same rule as AUROC.
        ap[bad_auc] = np.nan
        return auroc, ap


def binary_auroc(y: np.ndarray, s: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """AUROC with NaN labels masked; NaN if there is no positive or no negative."""
    y, s = np.asarray(y, dtype=np.float64).ravel(), np.asarray(s, dtype=np.float64).ravel()
    m = ~np.isnan(y)
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()[m][None]
    return float(RankedScores(y[m], s[m]).auroc_ap(w)[0][0])


def average_precision(y: np.ndarray, s: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """Average precision (scikit-learn's definition) with NaN labels masked."""
    y, s = np.asarray(y, dtype=np.float64).ravel(), np.asarray(s, dtype=np.float64).ravel()
    m = ~np.isnan(y)
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()[m][None]
    return float(RankedScores(y[m], s[m]).auroc_ap(w)[1][0])


def auroc_ap_masked(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """(AUROC, AP) of one finding with NaN labels *or* NaN scores masked; NaN when a class is missing."""
    y, s = np.asarray(y, dtype=np.float64).ravel(), np.asarray(s, dtype=np.float64).ravel()
    m = ~np.isnan(y) & ~np.isnan(s)
    auc, ap = RankedScores(y[m], s[m]).auroc_ap()
    return float(auc[0]), float(ap[0])


def macro_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Mean AUROC over the columns of y/s [N, C] that have both classes among rows with a label and a score
    (NaN in either is masked); NaN if no column has."""
    y, s = np.asarray(y, dtype=np.float64), np.asarray(s, dtype=np.float64)
    y, s = (y[:, None], s[:, None]) if y.ndim == 1 else (y, s)
    aucs = [a for a in (auroc_ap_masked(y[:, k], s[:, k])[0] for k in range(y.shape[1])) if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def label_score_columns(y: object, p: object, labels: str = "labels",
                        scores: str = "predictions") -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores as float64 [N, C] (a 1-D input is one column); ValueError naming both shapes when
    they differ."""
    ya = np.asarray(y, dtype=np.float64)
    pa = np.asarray(p, dtype=np.float64)
    ya = ya[:, None] if ya.ndim == 1 else ya
    pa = pa[:, None] if pa.ndim == 1 else pa
    if ya.shape != pa.shape:
        raise ValueError(f"{labels} {ya.shape} and {scores} {pa.shape} differ in shape")
    return ya, pa
