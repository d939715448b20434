"""Protocols on synthetic features (the trainer is real; the features are made informative on purpose)."""

import numpy as np
import pytest

from chexfound.errors import ChexfoundError
from chexfound.stats import BootstrapConfig
from chexfound.evaluate.protocols import (EvalConfig, Splits, run_compare, run_label_efficiency, run_ood,
                                          subsample_patients)
from chexfound.evaluate.trainers import LogisticTrainer
from chexfound.stats.thresholds import best_f1_thresholds

CFG = EvalConfig(bootstrap=BootstrapConfig(n_boot=100))


def _data(n_pat=150, per=2, c=3, signal=1.5, seed=0, d=8):
    rng = np.random.default_rng(seed)
    pats = np.repeat([f"p{i}" for i in range(n_pat)], per)
    n = pats.size
    y = (rng.random((n, c)) < [0.3, 0.15, 0.5][:c]).astype(float)
    y[rng.random((n, c)) < 0.05] = np.nan
    x = rng.normal(size=(n, d))
    x[:, :c] += signal * np.nan_to_num(y)
    split = np.array(["train", "val", "test"])[np.searchsorted([0.6, 0.8], rng.random(n_pat))]
    split = np.repeat(split, per)
    return x, y, pats, Splits.from_labels(split)


def test_best_f1_threshold_hand_case():
    y = np.array([[1], [1], [0], [0], [1]], dtype=float)
    p = np.array([[0.9], [0.8], [0.7], [0.2], [0.1]])
    # t=0.8 -> tp2 fp0 fn1 F1=0.8; t=0.1 -> tp3 fp2 F1=0.75; t=0.9 -> F1=0.5
    assert best_f1_thresholds(y, p)[0] == pytest.approx(0.8)
    assert best_f1_thresholds(np.zeros((3, 1)), np.ones((3, 1)))[0] == 0.5


def test_compare_reference_and_paired_difference():
    x, y, pats, sp = _data()
    rng = np.random.default_rng(1)
    noise = rng.normal(size=x.shape)
    m, art = run_compare({"good": (LogisticTrainer(), x), "noise": (LogisticTrainer(), noise)}, y, pats, sp,
                         ["A", "B", "C"], CFG)
    assert m["reference"] == "good" and m["macro"] == m["models"]["good"]["macro"]
    assert m["models"]["good"]["macro"]["auroc"] > 0.75
    assert abs(m["models"]["noise"]["macro"]["auroc"] - 0.5) < 0.15
    d = m["paired"]["noise - good"]["macro"]["auroc"]
    assert d["diff"] < 0 and d["ci"][1] < 0
    for f in ("A", "B", "C"):
        pf = m["per_finding"][f]
        assert pf["auroc_ci"][0] <= pf["auroc"] <= pf["auroc_ci"][1] and pf["n_pos"] > 0
        assert pf["group"] in ("head", "medium", "tail")
    assert art["predictions"]["good"].shape == (sp.test.size, 3)


def test_subsample_patients_keeps_whole_patients_and_both_classes():
    x, y, pats, sp = _data()
    sub = subsample_patients(sp.train, pats, 0.05, seed=3, y=y)
    chosen = set(pats[sub])
    # whole patients: every image of a chosen patient is in
    assert set(np.flatnonzero(np.isin(pats, list(chosen)))) & set(sp.train) == set(sub)
    assert len(chosen) == round(0.05 * np.unique(pats[sp.train]).size)
    for c in range(3):
        assert np.nansum(y[sub, c] == 1) > 0 and np.nansum(y[sub, c] == 0) > 0
    assert np.array_equal(subsample_patients(sp.train, pats, 1.0, 0), sp.train)
    with pytest.raises(ValueError):
        subsample_patients(sp.train, pats, 0.0, 0)


def test_label_efficiency_curve():
    x, y, pats, sp = _data(n_pat=200)
    m, _ = run_label_efficiency(LogisticTrainer(), x, y, pats, sp, ["A", "B", "C"], fractions=(0.05, 0.25, 1.0),
                                seeds=(0, 1), cfg=CFG)
    fr = [c["fraction"] for c in m["curve"]]
    assert fr == [0.05, 0.25, 1.0]
    n_img = [c["n_images_mean"] for c in m["curve"]]
    assert n_img[0] < n_img[1] < n_img[2] == sp.train.size
    assert [c["n_seeds"] for c in m["curve"]] == [2, 2, 1]
    assert len(m["runs"]) == 5
    assert m["curve"][-1]["auroc_mean"] > m["curve"][0]["auroc_mean"]
    assert m["macro"]["auroc"] == pytest.approx(m["curve"][-1]["auroc_mean"])
    assert "auroc_ci" in m["macro"]


def test_ood_maps_findings_and_reports_in_distribution():
    xa, ya, pa, spa = _data(seed=0)
    xb, yb, pb, spb = _data(seed=5, c=2)
    m, art = run_ood(LogisticTrainer(), xa, ya, pa, spa, ["Pneumonia", "Effusion", "Mass"],
                     xb, yb, pb, spb.test, ["PNEUMONIA", "Pleural Effusion"], CFG, names=("nih", "other"))
    assert m["mapping"] == {"Pneumonia": "PNEUMONIA", "Effusion": "Pleural Effusion"}
    assert set(m["per_finding"]) == {"PNEUMONIA", "Pleural Effusion"}
    assert set(m["in_distribution"]["per_finding"]) == {"PNEUMONIA", "Pleural Effusion"}
    assert m["in_distribution"]["macro"]["auroc"] > 0.7
    with pytest.raises(ChexfoundError, match="no shared findings"):
        run_ood(LogisticTrainer(), xa, ya, pa, spa, ["Mass", "Nodule", "Hernia"], xb, yb, pb, spb.test,
                ["Cardiomegaly", "Edema"], CFG)


def test_joint_logistic_matches_sklearn_per_finding():
    from sklearn.linear_model import LogisticRegression

    from chexfound.stats.logistic import fit_logistic

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5))
    y = (rng.random((120, 2)) < 1 / (1 + np.exp(-x[:, :2] * 2))).astype(float)
    y[:10, 1] = np.nan
    coef, b = fit_logistic(x, y, c=0.5, max_iter=1000, tol=1e-8)
    for k in range(2):
        m = ~np.isnan(y[:, k])
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=1000).fit(x[m], y[m, k])
        np.testing.assert_allclose(coef[k], ref.coef_[0], atol=1e-4)
        np.testing.assert_allclose(b[k], ref.intercept_[0], atol=1e-4)
