"""The one logistic probe, its regularisation search, the comparison table and the pixel baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chexfound.stats import BootstrapConfig, LogisticTrainer, compare_scores, fit_probe, pixel_features, pixel_vector
from chexfound.stats.logistic import patient_folds


def _data(n: int = 240, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pats = np.repeat(np.arange(n // 2), 2)
    y = (rng.random((n // 2, 2)) < [0.4, 0.2]).astype(float).repeat(2, axis=0)
    x = rng.normal(size=(n, d))
    x[:, :2] += 1.2 * y
    y[rng.random(y.shape) < 0.05] = np.nan
    return x, y, pats


def test_patient_folds_keep_patients_whole_and_are_balanced():
    pats = np.repeat(np.arange(30), 3)
    fold = patient_folds(pats, len(pats), 3, seed=0)
    for p in range(30):
        assert len(set(fold[pats == p])) == 1
    assert np.bincount(fold).tolist() == [30, 30, 30]


def test_probe_without_validation_selects_c_by_patient_cross_validation():
    x, y, pats = _data()
    probe = fit_probe(x, y, groups=pats, findings=["A", "B"])
    assert probe.info["selection"] == "3-fold cross-validated macro AUROC (patient folds)"
    assert set(probe.info["selection_scores"]) == {"0.001", "0.01", "0.1", "1.0"}
    best = max(probe.info["selection_scores"].values())
    assert probe.info["selection_scores"][str(probe.info["C"])] == best
    # Thresholds come from the out-of-fold scores, with a record per finding.
    assert probe.info["thresholds_from"] == "out-of-fold training scores"
    assert [c.finding for c in probe.threshold_choices] == ["A", "B"]
    # Deterministic for a seed; n_jobs changes nothing.
    again = fit_probe(x, y, groups=pats, n_jobs=4, findings=["A", "B"])
    np.testing.assert_array_equal(again.coef, probe.coef)


def test_probe_with_validation_rows_and_the_folded_weights():
    x, y, pats = _data(seed=1)
    tr, va = np.arange(160), np.arange(160, 240)
    probe = LogisticTrainer(findings=["A", "B"]).fit(x, y, tr, va)
    assert probe.info["selection"] == "validation macro AUROC" and probe.info["n_val"] == 80
    assert probe.info["thresholds_from"] == "validation scores"
    w, b = probe.folded()  # what a LinearHead file stores: the same logits on raw features
    np.testing.assert_allclose(x @ w.T + b, probe.decision_function(x), rtol=1e-9, atol=1e-9)
    p = probe.predict(x, va)
    assert p.shape == (80, 2) and np.all((p > 0) & (p < 1))
    # A finding with one class in training predicts its training prevalence (intercept only).
    y1 = y.copy()
    y1[:, 1] = 0.0
    const = fit_probe(x, y1, tr, va)
    assert const.info["constant_columns"] == [1] and np.allclose(const.predict(x, va)[:, 1], 1e-4)


def test_compare_scores_is_the_patient_bootstrap_of_every_model():
    rng = np.random.default_rng(2)
    pats = np.repeat(np.arange(80), 2)
    y = (rng.random((160, 2)) < 0.4).astype(float)
    good = y + rng.normal(scale=0.5, size=y.shape)
    noise = rng.normal(size=y.shape)
    cfg = BootstrapConfig(n_boot=200, seed=3)
    t = compare_scores(y, {"good": good, "noise": noise, "same": good}, ["A", "B"], pats, "noise", cfg)
    assert t.bootstrap["unit"] == "patients" and t.bootstrap["n_clusters"] == 80
    lo, hi = t.models["good"].auroc_ci
    assert lo <= t.models["good"].auroc <= hi
    # model - reference: good - noise is positive
    assert t.paired["good - noise"].auroc.ci[0] > 0 and t.paired["good - noise"].auroc.p_value < 0.05
    same = compare_scores(y, {"good": good, "same": good}, ["A", "B"], pats, "good", cfg).paired["same - good"]
    assert same.auroc.diff == 0 and list(same.auroc.ci) == [0.0, 0.0]
    img = compare_scores(y, {"good": good}, ["A", "B"], None, "good", cfg)
    assert img.bootstrap["unit"] == "images" and img.bootstrap["n_clusters"] == 160
    with pytest.raises(ValueError, match="reference"):
        compare_scores(y, {"good": good}, ["A", "B"], pats, "other", cfg)


def test_pixel_baseline_is_one_computation_for_batches_and_single_images():
    rng = np.random.default_rng(4)
    batch = torch.from_numpy(rng.integers(0, 256, (3, 1, 64, 64), dtype=np.uint8))
    feats = pixel_features(batch)
    assert feats.shape == (3, 32 * 32) and feats.dtype == np.float32
    for i in range(3):
        np.testing.assert_allclose(pixel_vector(batch[i]), feats[i], atol=1e-6)  # uint8 [1, S, S]
        np.testing.assert_allclose(pixel_vector(batch[i, 0].numpy() / 255.0), feats[i], atol=1e-6)  # as read
    # Area resizing: each output pixel is the mean of its 2 x 2 block.
    np.testing.assert_allclose(feats[0, 0], batch[0, 0, :2, :2].float().mean() / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="grayscale"):
        pixel_vector(np.zeros((2, 8, 8, 3)))
