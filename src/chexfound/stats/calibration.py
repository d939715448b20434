"""Calibration of probabilities: does "0.30" mean a 30% chance? Brier score, ECE, calibration intercept and slope,
reliability bins, and their patient-level bootstrap CIs (the same resamples as AUROC: resample.py).

Definitions (per finding, on labelled images only; NaN labels are masked out):
    brier          mean (p - y)^2 (scikit-learn's `brier_score_loss`)
    ece            expected calibration error over `ECE_BINS` (10) equal-mass bins: sum_b n_b / N |obs_b - mean p_b|,
                   with bins exactly as `sklearn.calibration.calibration_curve(strategy="quantile")` draws them
                   (edges at the score percentiles; ties fall in one bin, so a bin may be empty)
    cal_intercept  calibration-in-the-large: a in logit P(y=1) = a + logit(p) (slope fixed at 1); 0 is ideal,
                   > 0 means the probabilities are too low on average
    cal_slope      b in logit P(y=1) = a + b logit(p); 1 is ideal, < 1 means too extreme (overconfident)
Probabilities are clipped to [1e-6, 1 - 1e-6] before logit. A finding enters the macro mean by the same
eligibility rule as AUROC (chexfound.stats.multilabel). The logistic fits are Newton iterations; a fit that
does not converge (e.g. perfectly separated labels) is NaN.

CIs (`CI_METHODS`, chexfound.stats.resample), chosen by coverage on synthetic test sets of 100-1000 patients
(bench/calibration_ci.py):
    ece            the percentile interval widened to reach the estimate. ECE's resamples sit above its estimate
                   (duplicated patients and re-drawn bins only add apparent miscalibration), so on small test sets
                   the percentile interval can lie wholly above it (14-18% of calibrated sets). Efron's
                   bias-corrected (BC) interval contains the estimate exactly when the percentile one does, and
                   where it moves the interval down its upper end fell below the true ECE in 9-12% of miscalibrated
                   sets (n = 100, 300; coverage 0.87 against 0.94 at n = 300): it claims better calibration than
                   there is.
    cal_slope      BC: the slope's resamples lean low (z0 ~ -0.1 at n = 100); BC covered 0.92-0.95 where the
                   percentile interval covered 0.90-0.91 at n = 100, and as well or better at every size.
    brier, cal_intercept  the percentile interval: their resamples centre on the estimate (|z0| < 0.05) and BC
                   changed coverage by no more than the simulation's noise.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from chexfound.stats.multilabel import EligibilityRule
from chexfound.stats.ranking import label_score_columns
from chexfound.stats.resample import (BIAS_CORRECTED, PERCENTILE, WIDENED, BootstrapConfig, bias_corrected_ci,
                                      percentile_ci, resample_weights, widened_percentile_ci)

ECE_BINS = 10
EPS = 1e-6
KEYS = ("brier", "ece", "cal_intercept", "cal_slope")
# Which bootstrap interval each metric's CI is (bench/calibration_ci.py measured the choice; module docstring).
CI_METHODS: dict[str, str] = {"brier": PERCENTILE, "ece": WIDENED, "cal_intercept": PERCENTILE,
                              "cal_slope": BIAS_CORRECTED}


def interval(method: str, samples: np.ndarray, estimate: float, ci: float) -> tuple[float, float]:
    """The `ci` interval of bootstrap samples by `method` (PERCENTILE, BIAS_CORRECTED or WIDENED)."""
    if method == PERCENTILE:
        return percentile_ci(samples, ci)
    if method == BIAS_CORRECTED:
        return bias_corrected_ci(samples, estimate, ci)
    if method == WIDENED:
        return widened_percentile_ci(samples, estimate, ci)
    raise ValueError(f"unknown bootstrap interval {method!r}: expected one of {PERCENTILE!r}, "
                     f"{BIAS_CORRECTED!r}, {WIDENED!r}")


def logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(q) - np.log1p(-q)


def _weighted_percentiles(v: np.ndarray, w: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """np.percentile(np.repeat(v, w), qs * 100) for sorted v and integer weights w, without repeating."""
    cw = np.cumsum(w)
    m = cw[-1]
    h = (m - 1) * qs
    lo = np.floor(h)
    i0 = np.searchsorted(cw, lo, side="right")
    i1 = np.searchsorted(cw, np.minimum(lo + 1, m - 1), side="right")
    return v[i0] + (h - lo) * (v[i1] - v[i0])


def _bins(p_sorted: np.ndarray, w: np.ndarray, n_bins: int) -> np.ndarray:
    edges = _weighted_percentiles(p_sorted, w, np.linspace(0, 1, n_bins + 1))
    return np.searchsorted(edges[1:-1], p_sorted)


def _ece_sorted(y: np.ndarray, p: np.ndarray, w: np.ndarray, n_bins: int) -> float:
    """ECE of sorted scores p with labels y and integer weights w (zero-weight rows ignored)."""
    keep = w > 0
    if not keep.any():
        return float("nan")
    y, p, w = y[keep], p[keep], w[keep]
    ids = _bins(p, w, n_bins)
    tot = np.bincount(ids, weights=w, minlength=n_bins)
    s_p = np.bincount(ids, weights=w * p, minlength=n_bins)
    s_y = np.bincount(ids, weights=w * y, minlength=n_bins)
    nz = tot > 0
    return float(np.sum(np.abs(s_y[nz] - s_p[nz])) / tot.sum())


def _newton(z: np.ndarray, y: np.ndarray, w: np.ndarray, slope: bool, iters: int = 50,
            start: tuple[float, float] = (0.0, 1.0), tol: float = 1e-9) -> np.ndarray:
    """Weighted logistic fits for many weight rows at once: [R, n] weights -> [R, 2] (a, b) (b = 1 unless slope).
    Rows that do not converge are NaN. Resamples start from the full-data fit (`start`): a few steps each."""
    r = w.shape[0]
    a = np.full(r, start[0] if np.isfinite(start[0]) else 0.0)
    b = np.full(r, start[1] if slope and np.isfinite(start[1]) else 1.0)
    done = np.zeros(r, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for _ in range(iters):
            eta = a[:, None] + b[:, None] * z[None, :]
            mu = 1.0 / (1.0 + np.exp(-eta))
            res = w * (y[None, :] - mu)
            v = w * mu * (1 - mu)
            g0, h00 = res.sum(1), v.sum(1)
            if slope:
                g1, h01, h11 = res @ z, v @ z, v @ (z * z)
                det = h00 * h11 - h01 ** 2
                da = (h11 * g0 - h01 * g1) / det
                db = (h00 * g1 - h01 * g0) / det
            else:
                da, db = g0 / h00, np.zeros(r)
            da, db = np.where(done, 0, da), np.where(done, 0, db)
            a, b = a + da, b + db
            done |= (np.abs(da) < tol) & (np.abs(db) < tol)
            if done.all():
                break
    ok = done & np.isfinite(a) & np.isfinite(b) & (np.abs(a) < 1e3) & (np.abs(b) < 1e3)
    return np.where(ok[:, None], np.stack([a, b], 1), np.nan)


class FindingCalibration:
    """One finding's labelled rows, sorted by score, for calibration metrics under many resample weights."""

    def __init__(self, y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> None:
        y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
        lab = np.flatnonzero(~np.isnan(y) & ~np.isnan(p))
        self.rows = lab[np.argsort(p[lab], kind="stable")]
        self.y = (y[self.rows] == 1).astype(np.float64)
        self.p = p[self.rows]
        self.z = logit(self.p)
        self.n_bins = n_bins
        ones = np.ones((1, len(self.rows)))
        self.start_intercept = (float(_newton(self.z, self.y, ones, slope=False)[0, 0]), 1.0)
        self.start_slope = tuple(float(v) for v in _newton(self.z, self.y, ones, slope=True)[0])

    def evaluate(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """w: [R, n_images] resample weights -> {metric: [R]} (NaN where a resample lacks a class)."""
        ws = np.asarray(w, dtype=np.float64)[:, self.rows]
        tot = ws.sum(1)
        npos = ws @ self.y
        both = (npos > 0) & (npos < tot)
        with np.errstate(invalid="ignore", divide="ignore"):
            brier = ws @ ((self.p - self.y) ** 2) / tot
        ece = np.array([_ece_sorted(self.y, self.p, row, self.n_bins) for row in ws])
        # Resamples: warm-started, to 1e-7 (far below what a percentile interval resolves).
        tol = 1e-9 if len(ws) == 1 else 1e-7
        inter = _newton(self.z, self.y, ws, slope=False, start=self.start_intercept, tol=tol)[:, 0]
        slope = _newton(self.z, self.y, ws, slope=True, start=self.start_slope, tol=tol)[:, 1]  # type: ignore[arg-type]
        nan = np.full(len(ws), np.nan)
        return {"brier": np.where(tot > 0, brier, nan), "ece": np.where(tot > 0, ece, nan),
                "cal_intercept": np.where(both, inter, nan), "cal_slope": np.where(both, slope, nan)}


def calibration_metrics(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, float]:
    """Brier, ECE, calibration intercept and slope of one finding (y: 1/0/NaN, p: probabilities)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    if not np.any(~np.isnan(y)):
        return {k: float("nan") for k in KEYS}
    return {k: float(v[0]) for k, v in FindingCalibration(y, p, n_bins).evaluate(np.ones((1, y.size))).items()}


def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS, z: float = 1.96) -> dict[str, list[float]]:
    """The reliability diagram of one finding: per non-empty equal-mass bin, the mean prediction, the observed
    positive rate with its Wilson 95% interval (image-level, binomial), and the count."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    m = ~np.isnan(y) & ~np.isnan(p)
    y, p = (y[m] == 1).astype(np.float64), p[m]
    if not y.size:
        return {"mean_predicted": [], "observed": [], "observed_lo": [], "observed_hi": [], "count": []}
    order = np.argsort(p, kind="stable")
    y, p = y[order], p[order]
    ids = _bins(p, np.ones_like(p), n_bins)
    tot = np.bincount(ids, minlength=n_bins)
    nz = tot > 0
    n = tot[nz].astype(np.float64)
    obs = np.bincount(ids, weights=y, minlength=n_bins)[nz] / n
    mp = np.bincount(ids, weights=p, minlength=n_bins)[nz] / n
    centre = (obs + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(obs * (1 - obs) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = np.minimum(np.clip(centre - half, 0, 1), obs), np.maximum(np.clip(centre + half, 0, 1), obs)
    return {"mean_predicted": mp.tolist(), "observed": obs.tolist(), "observed_lo": lo.tolist(),
            "observed_hi": hi.tolist(), "count": n.astype(int).tolist()}


def calibration_summary(
    y: np.ndarray, p: np.ndarray, findings: Sequence[str], groups: Sequence[Any] | np.ndarray | None,
    cfg: BootstrapConfig = BootstrapConfig(), rule: EligibilityRule = EligibilityRule(), n_bins: int = ECE_BINS,
    with_ci: bool = True, ci_methods: Mapping[str, str] = CI_METHODS,
) -> dict[str, Any]:
    """Per finding and macro: brier, ece, cal_intercept, cal_slope, each with `<name>_ci` from the patient-level
    bootstrap (the same resamples as `bootstrap_multilabel` for the same cfg), the interval per metric named by
    `ci_methods`. Ineligible findings are listed with their point values and no CI, and left out of the macro
    means.

    Returns {"per_finding": {name: {"brier", "brier_ci", "ece", ...}}, "macro": {...}, "ece_bins": n_bins,
    "ci_method": {metric: interval}, "definitions": ...}."""
    methods = {k: ci_methods.get(k, PERCENTILE) for k in KEYS}
    y, p = label_score_columns(y, p)
    nan2 = [float("nan"), float("nan")]
    per: dict[str, dict[str, Any]] = {}
    eligible: list[int] = []
    for c, name in enumerate(findings):
        col = y[:, c]
        ok = rule.ok(int(np.sum(col == 1)), int(np.sum(col == 0)))
        per[name] = {**calibration_metrics(col, p[:, c], n_bins), **{f"{k}_ci": list(nan2) for k in KEYS}}
        if ok:
            eligible.append(c)
    macro: dict[str, Any] = {"n_findings": len(eligible)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for k in KEYS:
            vals = np.array([per[findings[c]][k] for c in eligible], dtype=np.float64)
            macro[k] = float(np.nanmean(vals)) if vals.size and not np.all(np.isnan(vals)) else float("nan")
            macro[f"{k}_ci"] = list(nan2)
    if with_ci and cfg.n_boot > 0 and eligible:
        fcs = [FindingCalibration(y[:, c], p[:, c], n_bins) for c in eligible]
        draws: list[dict[str, list[np.ndarray]]] = [{k: [] for k in KEYS} for _ in eligible]
        for w in resample_weights(groups, y.shape[0], cfg):
            for j, fc in enumerate(fcs):
                for k, v in fc.evaluate(w).items():
                    draws[j][k].append(v)
        arr = [{k: np.concatenate(d[k]) for k in KEYS} for d in draws]
        for j, c in enumerate(eligible):
            for k in KEYS:
                per[findings[c]][f"{k}_ci"] = list(interval(methods[k], arr[j][k], per[findings[c]][k], cfg.ci))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for k in KEYS:
                macro[f"{k}_ci"] = list(interval(methods[k], np.nanmean(np.stack([a[k] for a in arr], 1), 1),
                                                 macro[k], cfg.ci))
    return {"per_finding": per, "macro": macro, "eligible": [findings[c] for c in eligible], "ece_bins": n_bins,
            "ci_method": methods,
            "definitions": __doc__.split("Definitions", 1)[1].split("Probabilities are", 1)[0].strip(" :\n")}
