"""Bootstrap CIs resample patients, not images."""

import numpy as np
import pytest

from chexfound.stats import (BootstrapConfig, bootstrap_multilabel, multilabel_metrics, paired_bootstrap,
                             resample_weights)


def _data(n_pat: int, per_patient: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n_pat, 2)) < 0.4).astype(float)
    p = np.clip(0.35 * y + rng.random((n_pat, 2)) * 0.8, 0, 1)
    pats = np.repeat(np.arange(n_pat), per_patient)
    return np.repeat(y, per_patient, axis=0), np.repeat(p, per_patient, axis=0), pats


def _width(res, f="A"):
    lo, hi = res["per_finding"][f]["auroc_ci"]
    return hi - lo


CFG = BootstrapConfig(n_boot=300, seed=7)


def test_weights_are_constant_within_a_patient_and_count_patients():
    pats = np.array(["p1", "p1", "p2", "p3", "p3", "p3"])
    for w in resample_weights(pats, 6, BootstrapConfig(n_boot=50, chunk=20)):
        assert w.shape[1] == 6
        assert np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 3] == w[:, 4]) and np.all(w[:, 4] == w[:, 5])
        # each resample draws 3 patients: sum of per-patient counts == 3
        assert np.all(w[:, 0] + w[:, 2] + w[:, 3] == 3)


def test_duplicating_each_patients_images_leaves_patient_ci_unchanged():
    y, p, pats = _data(60, 1)
    y3, p3, pats3 = _data(60, 3)  # every patient now has three identical images
    base = bootstrap_multilabel(y, p, ["A", "B"], pats, cfg=CFG)
    dup = bootstrap_multilabel(y3, p3, ["A", "B"], pats3, cfg=CFG)
    assert dup["per_finding"]["A"]["auroc_ci"] == pytest.approx(base["per_finding"]["A"]["auroc_ci"])
    assert dup["macro"]["ap_ci"] == pytest.approx(base["macro"]["ap_ci"])
    # An image-level bootstrap would have counted the copies as new evidence and narrowed the interval.
    img = bootstrap_multilabel(y3, p3, ["A", "B"], pats3, cfg=BootstrapConfig(n_boot=300, seed=7, level="image"))
    assert _width(img) < 0.8 * _width(dup)


def test_ci_width_reflects_number_of_patients_not_images():
    y, p, pats = _data(40, 10)          # 400 images from 40 patients
    y1, p1, pats1 = _data(400, 1, 1)    # 400 images from 400 patients
    clustered = bootstrap_multilabel(y, p, ["A", "B"], pats, cfg=CFG)
    independent = bootstrap_multilabel(y1, p1, ["A", "B"], pats1, cfg=CFG)
    assert _width(clustered) > 2 * _width(independent)
    assert clustered["config"]["n_clusters"] == 40


def test_ci_contains_point_estimate_and_reports_degenerate_resamples():
    y, p, pats = _data(80, 2, 3)
    y[:, 1] = 0
    y[:2, 1] = 1  # finding B: one positive patient -> many resamples without a positive
    point = multilabel_metrics(y, p, ["A", "B"])
    res = bootstrap_multilabel(y, p, ["A", "B"], pats, cfg=CFG)
    lo, hi = res["per_finding"]["A"]["auroc_ci"]
    assert lo <= point["per_finding"]["A"]["auroc"] <= hi
    assert 0 <= lo <= hi <= 1
    # P(patient never drawn) ~ (1 - 1/80)^80 ~ 0.37
    assert 0.2 * 300 < res["per_finding"]["B"]["n_degenerate"] < 0.55 * 300
    assert res["per_finding"]["A"]["n_degenerate"] == 0


def test_subset_means():
    y, p, pats = _data(50, 1)
    res = bootstrap_multilabel(y, p, ["A", "B"], pats, cfg=CFG, subsets={"head": ["A"], "tail": []})
    assert res["subsets"]["head"]["auroc_ci"] == pytest.approx(res["per_finding"]["A"]["auroc_ci"])
    assert np.isnan(res["subsets"]["tail"]["auroc_ci"][0])


def test_paired_bootstrap_identical_and_better_model():
    y, p, pats = _data(100, 2, 4)
    same = paired_bootstrap(y, p, p, ["A", "B"], pats, cfg=CFG)
    assert same["macro"]["auroc"]["diff"] == 0 and same["macro"]["auroc"]["ci"] == [0.0, 0.0]
    assert same["per_finding"]["A"]["auroc"]["p_value"] == 1.0
    rng = np.random.default_rng(0)
    noisy = np.clip(p + rng.normal(scale=0.6, size=p.shape), -1, 2)
    better = paired_bootstrap(y, p, noisy, ["A", "B"], pats, cfg=CFG)
    d = better["macro"]["auroc"]
    assert d["diff"] > 0 and d["ci"][0] > 0 and d["p_value"] < 0.05
    worse = paired_bootstrap(y, noisy, p, ["A", "B"], pats, cfg=CFG)
    assert worse["macro"]["auroc"]["diff"] == pytest.approx(-d["diff"])
    assert worse["macro"]["auroc"]["ci"] == pytest.approx([-d["ci"][1], -d["ci"][0]])


def test_bootstrap_statistic_resamples_patients():
    from chexfound.stats.resample import bootstrap_statistic, resample_indices

    pats = np.array(["a", "a", "a", "b", "c"])
    for idx in resample_indices(pats, 5, BootstrapConfig(n_boot=30, chunk=7)):
        # images 0-2 (patient a) are always drawn together, as often as each other
        assert np.sum(idx == 0) == np.sum(idx == 1) == np.sum(idx == 2)
    x = np.arange(40, dtype=float)
    res = bootstrap_statistic(lambda i: float(np.mean(x[i])), 40, np.repeat(np.arange(10), 4), CFG)
    assert res["ci"][0] < x.mean() < res["ci"][1] and res["n_degenerate"] == 0


def test_micro_ci_brackets_point_estimate():
    y, p, pats = _data(60, 2, 9)
    point = multilabel_metrics(y, p, ["A", "B"])["micro"]
    res = bootstrap_multilabel(y, p, ["A", "B"], pats, cfg=CFG)
    for k in ("auroc", "ap"):
        lo, hi = res["micro"][f"{k}_ci"]
        assert lo <= point[k] <= hi


def test_weighted_resamples_equal_materialised_ones_with_unlabelled_rows():
    """The weight-matrix bootstrap is the textbook one: each resample equals scikit-learn on the patients'
    images copied as often as drawn, NaN labels dropped per finding; macro and paired differences included."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from chexfound.stats.resample import percentile_ci, resample_indices

    rng = np.random.default_rng(3)
    n, pats = 90, rng.integers(0, 30, 90)
    y = (rng.random((n, 2)) < 0.4).astype(float)
    y[rng.random((n, 2)) < 0.3] = np.nan  # not labelled: dropped for that finding only
    p_a = np.round(rng.random((n, 2)) + 0.4 * np.nan_to_num(y), 1)  # rounded: many ties
    p_b = np.round(rng.random((n, 2)) + 0.2 * np.nan_to_num(y), 1)
    cfg = BootstrapConfig(n_boot=60, seed=5, chunk=13)

    def per_finding(idx, p):
        out = []
        for c in range(2):
            yy, m = y[idx, c], ~np.isnan(y[idx, c])
            if len(np.unique(yy[m])) < 2:
                out.append((np.nan, np.nan))
                continue
            out.append((roc_auc_score(yy[m], p[idx, c][m]), average_precision_score(yy[m], p[idx, c][m])))
        return np.array(out)

    draws_a = np.array([per_finding(i, p_a) for i in resample_indices(pats, n, cfg)])  # [B, finding, (auc, ap)]
    draws_b = np.array([per_finding(i, p_b) for i in resample_indices(pats, n, cfg)])
    res = bootstrap_multilabel(y, p_a, ["A", "B"], pats, cfg=cfg)
    for c, f in enumerate(["A", "B"]):
        assert res["per_finding"][f]["auroc_ci"] == pytest.approx(percentile_ci(draws_a[:, c, 0], 0.95), abs=1e-12)
        assert res["per_finding"][f]["ap_ci"] == pytest.approx(percentile_ci(draws_a[:, c, 1], 0.95), abs=1e-12)
    macro_a, macro_b = np.nanmean(draws_a[..., 0], axis=1), np.nanmean(draws_b[..., 0], axis=1)
    assert res["macro"]["auroc_ci"] == pytest.approx(percentile_ci(macro_a, 0.95), abs=1e-12)
    d = paired_bootstrap(y, p_a, p_b, ["A", "B"], pats, cfg=cfg)["macro"]["auroc"]
    assert d["ci"] == pytest.approx(percentile_ci(macro_a - macro_b, 0.95), abs=1e-12)
    point = [multilabel_metrics(y, p, ["A", "B"])["macro"]["auroc"] for p in (p_a, p_b)]
    assert d["diff"] == pytest.approx(point[0] - point[1], abs=1e-12)
