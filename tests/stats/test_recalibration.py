"""Post-hoc calibrators: they fix known miscalibration, keep the ranking (AUROC), and follow the stated rule."""

from __future__ import annotations

import numpy as np
import pytest

from chexfound.stats.calibration import calibration_metrics, logit
from chexfound.stats.ranking import binary_auroc
from chexfound.stats.recalibration import (CalibrationPolicy, apply_binary, choose_calibrator,
                                           choose_multiclass_temperature, fit_isotonic)


def _overconfident(n: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """True probability sigmoid(z); the model reports sigmoid(z * temperature) (overconfident for T > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-z))).astype(float)
    return y, 1 / (1 + np.exp(-z * temperature))


def test_temperature_recovers_a_known_overconfidence_and_lowers_ece():
    y, p = _overconfident(4000, 2.5, 0)
    ch = choose_calibrator(y, p, "A", CalibrationPolicy(isotonic_min=10**9))
    assert ch.method in ("temperature", "platt")
    assert 1 / ch.scale == pytest.approx(2.5, rel=0.15)
    before, after = calibration_metrics(y, p), calibration_metrics(y, ch.apply(p))
    assert after["ece"] < before["ece"] / 2 and after["brier"] < before["brier"]
    assert abs(after["cal_slope"] - 1) < 0.1


def test_a_calibrated_head_keeps_none_and_small_validation_falls_back():
    y, p = _overconfident(3000, 1.0, 1)
    assert choose_calibrator(y, p).method == "none"  # the simplest within the tolerance of the best
    few = choose_calibrator(y[:15], p[:15])
    assert few.method == "none" and "too few" in few.reason and "(< 10)" in few.reason


def test_isotonic_is_strictly_monotone_and_keeps_auroc_despite_ties():
    rng = np.random.default_rng(2)
    p = np.round(rng.uniform(0, 1, 3000), 2)  # many tied scores
    y = (rng.uniform(size=p.size) < np.where(p < 0.5, 0.1, 0.8)).astype(float)  # a step: no logistic curve fits
    kx, ky = fit_isotonic(y, p)
    assert kx[0] == 0 and kx[-1] == 1 and np.all(np.diff(kx) > 0) and np.all(np.diff(ky) > 0)
    ch = choose_calibrator(y, p)
    assert ch.method == "isotonic"
    q = ch.apply(p)
    # Distinct scores stay distinct and in order; tied scores stay tied: AUROC is exactly unchanged.
    order = np.argsort(p)
    assert np.all(np.diff(q[order]) >= 0) and len(np.unique(q)) == len(np.unique(p))
    assert binary_auroc(y, q) == pytest.approx(binary_auroc(y, p), abs=1e-12)
    assert calibration_metrics(y, q)["ece"] < calibration_metrics(y, p)["ece"] / 2


@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_every_calibrator_keeps_auroc(temperature):
    y, p = _overconfident(2000, temperature, 3)
    y[::7] = np.nan
    ch = choose_calibrator(y, p)
    m = ~np.isnan(y)
    assert binary_auroc(y[m], ch.apply(p)[m]) == pytest.approx(binary_auroc(y[m], p[m]), abs=1e-12)
    assert np.isfinite(logit(ch.apply(p))).all()


def test_multiclass_one_temperature():
    rng = np.random.default_rng(4)
    z = rng.normal(0, 1.2, (3000, 3))
    pt = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    t = np.array([rng.choice(3, p=row) for row in pt]).astype(float)
    reported = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)  # overconfident by 3
    ch = choose_multiclass_temperature(t, reported)
    assert ch["method"] == "temperature" and ch["temperature"] == pytest.approx(3.0, rel=0.15)
    assert choose_multiclass_temperature(t[:20], reported[:20])["method"] == "none"
