"""The bias-corrected (BC) percentile interval: Efron's formula, scipy's BCa where the acceleration is 0, the
fallbacks that keep the estimate inside, and the calibration CIs that use it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.stats import norm

from chexfound.stats import BootstrapConfig, bias_corrected_ci, percentile_ci
from chexfound.stats.calibration import CI_METHODS, KEYS, calibration_summary
from chexfound.stats.resample import BIAS_CORRECTED, PERCENTILE, WIDENED, widened_percentile_ci


def _efron(s: np.ndarray, est: float, ci: float) -> tuple[float, float]:
    share = (np.sum(s < est) + 0.5 * np.sum(s == est)) / s.size
    z0, z = norm.ppf(share), norm.ppf(1 - (1 - ci) / 2)
    lo, hi = np.quantile(s, norm.cdf([2 * z0 - z, 2 * z0 + z]))
    return float(lo), float(hi)


@pytest.mark.parametrize("est, ci", [(1.3, 0.95), (0.7, 0.9), (2.6, 0.95)])
def test_equals_efrons_formula(est, ci):
    s = np.random.default_rng(0).gamma(2.0, 1.0, 4000)  # skewed: z0 far from 0 for these estimates
    s[::97] = np.nan  # ignored
    got = bias_corrected_ci(s, est, ci)
    ref = _efron(s[~np.isnan(s)], est, ci)
    assert got == pytest.approx(ref, rel=1e-12)
    assert got[0] <= est <= got[1]
    assert abs(norm.ppf(np.nanmean(s < est))) > 0.3  # the correction is really exercised


def test_ties_at_the_estimate_count_half():
    s = np.repeat(np.arange(10.0), 50)  # 50 samples equal to the estimate
    got = bias_corrected_ci(s, 4.0, 0.95)
    assert got == pytest.approx(_efron(s, 4.0, 0.95), rel=1e-12)
    # A median estimate with symmetric samples: z0 = 0, the percentile interval.
    sym = np.random.default_rng(1).normal(size=2001)
    assert bias_corrected_ci(sym, float(np.median(sym)), 0.95) == pytest.approx(percentile_ci(sym, 0.95), rel=1e-9)


def test_equals_scipy_bca_when_the_acceleration_is_zero():
    """|mean| of data symmetric about a small positive centre: the bootstrap folds at 0, so resamples sit above
    the estimate (z0 < 0), while every jackknife |mean| is positive and symmetric, so BCa's acceleration is 0."""
    rng = np.random.default_rng(2)
    half = rng.normal(size=30)
    x = 0.05 + np.concatenate([half, -half])  # mirrored: jackknife skewness exactly 0
    assert np.all(x.sum() - x > 0)  # every jackknife mean positive: |.| does not fold them

    def stat(v, axis=-1):
        return np.abs(np.mean(v, axis=axis))

    res = stats.bootstrap((x,), stat, method="BCa", n_resamples=5000, confidence_level=0.95,
                          rng=np.random.default_rng(3))
    s = res.bootstrap_distribution
    share = np.mean(s < stat(x))
    assert 0.025 < share < 0.4  # a real bias correction, inside the range where BC applies
    got = bias_corrected_ci(s, float(stat(x)), 0.95)
    assert got == pytest.approx((res.confidence_interval.low, res.confidence_interval.high), rel=1e-6)
    assert got != pytest.approx(percentile_ci(s, 0.95), rel=1e-3)


def test_fallbacks_keep_the_estimate_inside():
    rng = np.random.default_rng(4)
    above = 1.0 + rng.gamma(2.0, 1.0, 1000)  # every sample above the estimate
    lo, hi = bias_corrected_ci(above, 1.0, 0.95)
    assert lo == 1.0 and hi == pytest.approx(percentile_ci(above, 0.95)[1])
    lo, hi = bias_corrected_ci(-above, -1.0, 0.95)  # every sample below
    assert hi == -1.0 and lo == pytest.approx(percentile_ci(-above, 0.95)[0])
    # Estimate below 2.5 % of the samples but not all: Efron's formula would put both ends below it.
    s = rng.normal(size=1000)
    est = float(np.quantile(s, 0.01))
    assert _efron(s, est, 0.95)[1] < est
    assert bias_corrected_ci(s, est, 0.95) == pytest.approx((est, percentile_ci(s, 0.95)[1]))
    assert widened_percentile_ci(s, est, 0.95) == bias_corrected_ci(s, est, 0.95)
    assert widened_percentile_ci(s, float(np.median(s)), 0.95) == percentile_ci(s, 0.95)
    # No finite sample, or no estimate.
    assert np.isnan(bias_corrected_ci(np.full(5, np.nan), 0.3, 0.95)).all()
    assert bias_corrected_ci(s, float("nan"), 0.95) == percentile_ci(s, 0.95)


def _calibrated(seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """100 patients with 2 images each, 3 findings, perfectly calibrated: y ~ Bernoulli(p)."""
    rng = np.random.default_rng(seed)
    p = rng.beta(1, 3, (200, 3))
    y = (rng.uniform(size=p.shape) < p).astype(float)
    return y, p, np.repeat(np.arange(100), 2)


def test_ece_ci_contains_the_estimate_where_the_percentile_interval_does_not():
    y, p, pats = _calibrated()
    cfg = BootstrapConfig(n_boot=400, seed=3)
    s = calibration_summary(y, p, ["A", "B", "C"], pats, cfg)
    old = calibration_summary(y, p, ["A", "B", "C"], pats, cfg, ci_methods={k: PERCENTILE for k in KEYS})
    rows = [(s["per_finding"][f], old["per_finding"][f]) for f in "ABC"] + [(s["macro"], old["macro"])]
    # The percentile interval sits wholly above the estimate for the macro and at least one finding.
    above = [o["ece_ci"][0] > o["ece"] for _, o in rows]
    assert above[-1] and sum(above) >= 2
    for (new, o), was_above in zip(rows, above):
        lo, hi = new["ece_ci"]
        assert lo <= new["ece"] <= hi and lo < hi
        # From the estimate to the upper end the resamples support where the percentile interval missed it,
        # else the percentile interval itself.
        assert (lo, hi) == pytest.approx((new["ece"] if was_above else o["ece_ci"][0], o["ece_ci"][1]))
    assert s["ci_method"] == CI_METHODS
    assert CI_METHODS == {"brier": PERCENTILE, "ece": WIDENED, "cal_intercept": PERCENTILE,
                          "cal_slope": BIAS_CORRECTED}
    for k in ("brier", "cal_intercept"):  # percentile intervals, as before
        assert s["macro"][f"{k}_ci"] == old["macro"][f"{k}_ci"]
    bc = calibration_summary(y, p, ["A", "B", "C"], pats, cfg, ci_methods={"cal_slope": BIAS_CORRECTED})
    assert s["per_finding"]["A"]["cal_slope_ci"] == bc["per_finding"]["A"]["cal_slope_ci"]
    assert s["per_finding"]["A"]["cal_slope_ci"] != old["per_finding"]["A"]["cal_slope_ci"]


def test_an_unknown_interval_is_refused():
    y, p, pats = _calibrated()
    with pytest.raises(ValueError, match="unknown bootstrap interval"):
        calibration_summary(y, p, ["A", "B", "C"], pats, BootstrapConfig(n_boot=20), ci_methods={"ece": "bca"})
