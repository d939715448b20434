"""Calibration metrics equal scikit-learn's on the same data; their bootstrap CIs use the AUROC resamples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from chexfound.stats import BootstrapConfig, EligibilityRule, bootstrap_multilabel
from chexfound.stats.calibration import (ECE_BINS, FindingCalibration, calibration_metrics, calibration_summary,
                                         logit, reliability_bins)


def _data(n: int = 400, seed: int = 0, power: float = 1.6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.99, n)
    y = (rng.uniform(size=n) < p ** power).astype(float)
    y[rng.choice(n, n // 10, replace=False)] = np.nan  # unlabelled: masked out
    return y, p


def test_numbers_equal_scikit_learn_on_the_labelled_rows():
    y, p = _data()
    m = ~np.isnan(y)
    got = calibration_metrics(y, p)
    assert got["brier"] == pytest.approx(brier_score_loss(y[m], p[m]), rel=1e-12)
    # ECE from calibration_curve's own equal-mass bins, weighted by bin counts.
    true, pred = calibration_curve(y[m], p[m], n_bins=ECE_BINS, strategy="quantile")
    edges = np.percentile(p[m], np.linspace(0, 100, ECE_BINS + 1))
    counts = np.bincount(np.searchsorted(edges[1:-1], p[m]), minlength=ECE_BINS)
    counts = counts[counts > 0]
    assert got["ece"] == pytest.approx(float(np.sum(counts * np.abs(true - pred)) / counts.sum()), rel=1e-12)
    bins = reliability_bins(y, p)
    np.testing.assert_allclose(bins["observed"], true, rtol=1e-12)
    np.testing.assert_allclose(bins["mean_predicted"], pred, rtol=1e-12)
    assert all(lo <= o <= hi for lo, o, hi in zip(bins["observed_lo"], bins["observed"], bins["observed_hi"]))
    # Slope: an unpenalised logistic regression on logit(p); intercept: slope fixed at 1 (the score equation).
    lr = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(logit(p[m])[:, None], y[m])
    assert got["cal_slope"] == pytest.approx(float(lr.coef_[0, 0]), rel=1e-5)
    a = got["cal_intercept"]
    assert np.mean(1 / (1 + np.exp(-(a + logit(p[m]))))) == pytest.approx(np.mean(y[m]), abs=1e-9)
    # Miscalibrated in a known direction: p ** 1.6 < p, so the probabilities are too high -> intercept < 0.
    assert a < 0 and got["ece"] > 0.05


def test_a_calibrated_model_scores_as_calibrated():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.02, 0.98, 20_000)
    y = (rng.uniform(size=p.size) < p).astype(float)
    got = calibration_metrics(y, p)
    assert abs(got["cal_intercept"]) < 0.05 and abs(got["cal_slope"] - 1) < 0.05 and got["ece"] < 0.02


def test_resample_weights_equal_repeated_rows():
    """The weighted path (no copies) gives what the metrics give on the materialised resample."""
    y, p = _data(120, 2)
    fc = FindingCalibration(y, p)
    w = np.random.default_rng(3).integers(0, 3, size=(4, y.size)).astype(float)
    got = fc.evaluate(w)
    for r in range(4):
        idx = np.repeat(np.arange(y.size), w[r].astype(int))
        ref = calibration_metrics(y[idx], p[idx])
        for k, v in ref.items():
            assert got[k][r] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_summary_cis_per_finding_and_macro_and_the_eligibility_rule():
    y1, p1 = _data(300, 4)
    y2 = np.full(300, 0.0)
    y2[:3] = 1  # 3 positives: below the rule's minimum -> listed, no CI, not in the macro
    y = np.stack([y1, y2], 1)
    p = np.stack([p1, np.clip(p1 * 0.5, 0, 1)], 1)
    pats = np.repeat(np.arange(150), 2)
    cfg = BootstrapConfig(n_boot=200, seed=5)
    rule = EligibilityRule(min_pos=5)
    s = calibration_summary(y, p, ["A", "B"], pats, cfg, rule)
    a, b = s["per_finding"]["A"], s["per_finding"]["B"]
    for k in ("brier", "ece", "cal_intercept", "cal_slope"):
        lo, hi = a[f"{k}_ci"]
        assert lo <= a[k] <= hi and lo < hi
        assert np.isnan(b[f"{k}_ci"]).all() and np.isfinite(b[k])
        assert s["macro"][k] == pytest.approx(a[k])  # the macro of the one eligible finding
    assert s["eligible"] == ["A"] and s["ece_bins"] == ECE_BINS
    # The same patient resamples as the AUROC CIs (same seed): the same number of draws per finding.
    bs = bootstrap_multilabel(y, p, ["A", "B"], pats, cfg=cfg, rule=rule)
    assert set(bs["per_finding"]) == {"A"}
