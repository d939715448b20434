"""Decision thresholds: validation-optimal only with strong evidence, else the training prevalence."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from chexfound.stats.thresholds import (ThresholdPolicy, best_f1_thresholds, choose_thresholds, label_prevalence,
                                        prevalence_threshold, thresholds_of, youden_thresholds)


def _scores(n: int, prevalence: float, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(float)
    return y, 1 / (1 + np.exp(-(rng.normal(size=n) + separation * y - 2)))


def test_strong_validation_evidence_keeps_the_f1_optimum():
    y, p = _scores(400, 0.3, 3.0, 0)
    (ch,) = choose_thresholds(y[:, None], p[:, None], "f1", prevalence=[0.3], findings=["A"])
    assert ch.rule == "f1" and ch.threshold == pytest.approx(best_f1_thresholds(y[:, None], p[:, None])[0])
    assert ch.n_val_pos == int(y.sum()) and ch.val_auroc > 0.9 and ch.prevalence_source == "training"
    assert "validation AUROC" in ch.reason and not ch.warnings


def test_youden_matches_scikit_learn():
    y, p = _scores(300, 0.4, 1.5, 1)
    fpr, tpr, thr = roc_curve(y, p)
    assert youden_thresholds(y[:, None], p[:, None])[0] == pytest.approx(thr[int(np.argmax(tpr - fpr))])
    (ch,) = choose_thresholds(y[:, None], p[:, None], "youden")
    assert ch.rule == "youden" and ch.threshold == pytest.approx(thr[int(np.argmax(tpr - fpr))])


def test_too_few_positives_fall_back_to_the_training_prevalence():
    y, p = _scores(200, 0.03, 3.0, 2)
    assert 0 < y.sum() < 10
    (ch,) = choose_thresholds(y[:, None], p[:, None], "f1", prevalence=[0.05])
    assert ch.rule == "prevalence" and "(< 10)" in ch.reason
    # The (1 - prevalence) quantile of the validation scores: about 5 % of them are called positive.
    assert ch.threshold == pytest.approx(np.quantile(p, 0.95))
    assert ch.val_call_rate == pytest.approx(0.05, abs=0.01)


def test_near_random_validation_auroc_falls_back_and_the_policy_is_settable():
    y, p = _scores(400, 0.3, 0.1, 3)
    (ch,) = choose_thresholds(y[:, None], p[:, None], "f1", prevalence=[0.3])
    assert ch.rule == "prevalence" and "near-random" in ch.reason and ch.val_auroc < 0.7
    strict = choose_thresholds(y[:, None], p[:, None], "f1", prevalence=[0.3],
                               policy=ThresholdPolicy(min_positives=500))
    assert "(< 500)" in strict[0].reason


def test_an_all_positive_optimum_falls_back_and_degenerate_thresholds_are_flagged():
    # F1 of calling everything positive (2p / (1 + p) = 0.46 at p = 0.3) beats this weak ranker's best cut.
    y, p = _scores(400, 0.3, 0.1, 3)
    lax = ThresholdPolicy(min_auroc=0.0)
    assert best_f1_thresholds(y[:, None], p[:, None])[0] <= np.quantile(p, 0.01)
    (ch,) = choose_thresholds(y[:, None], p[:, None], "f1", prevalence=[0.3], policy=lax)
    assert ch.rule == "prevalence" and "every validation image" in ch.reason
    assert ch.val_call_rate == pytest.approx(0.3, abs=0.01) and not ch.warnings
    # A near-constant head: the prevalence quantile sits on the tie and calls almost everything -> flagged.
    flat = np.where(np.arange(400) < 390, 0.2, 0.9)
    (deg,) = choose_thresholds(y[:, None], flat[:, None], "prevalence", prevalence=[0.1])
    assert deg.val_call_rate > 0.9 and deg.degenerate and any("every image" in w for w in deg.warnings)
    # A quarter of the images tie at the top: the quantile calls 25 %, over twice the 10 % prevalence -> flagged.
    quarter = np.where(np.arange(400) < 300, 0.2, 0.9)
    (deg,) = choose_thresholds(y[:, None], quarter[:, None], "prevalence", prevalence=[0.1])
    assert deg.val_call_rate == 0.25 and any("prevalence is 10%" in w for w in deg.warnings)
    # Too few validation images to judge a call rate: nothing is flagged.
    (few,) = choose_thresholds(y[:10, None], flat[:10, None], "prevalence", prevalence=[0.1])
    assert few.val_call_rate == 1.0 and not few.warnings


def test_prevalence_sources_and_edge_cases():
    y = np.array([[1, np.nan], [0, np.nan], [0, np.nan], [1, np.nan]])
    assert label_prevalence(y)[0] == 0.5 and np.isnan(label_prevalence(y)[1])
    p = np.tile(np.array([[0.9], [0.1], [0.2], [0.8]]), (1, 2))
    a, b = choose_thresholds(y, p, "f1", prevalence=[np.nan, np.nan], findings=["A", "B"])
    assert a.prevalence_source == "validation" and b.rule == "default" and b.threshold == 0.5
    assert thresholds_of([a, b]).shape == (2,)
    # No training positives: nothing is called; the threshold survives the heads' float32 buffer.
    t = prevalence_threshold(np.array([0.1, 0.4, 0.7]), 0.0)
    assert np.float32(t) > np.float32(0.7)
    with pytest.raises(ValueError, match="threshold method"):
        choose_thresholds(y, p, "max")
    assert choose_thresholds(np.zeros((0, 1)), np.zeros((0, 1)), "f1")[0].rule == "default"


def test_weak_head_on_nih14_calls_about_as_many_findings_as_the_labels(data_root):
    """On the shared NIH-14 images a near-random head (the logistic probe on 32x32 pixels) with F1
    thresholds called about half the findings positive; with the fallback it says about as much as the labels."""
    from chexfound.data.manifest import patient_split
    from chexfound.data.readers import read_nih14_shared
    from chexfound.io import read_image
    from chexfound.stats import fit_probe, pixel_vector

    m = read_nih14_shared(data_root / "nih14")
    findings = [c for c in m.label_columns if c != "Hernia"]  # 2 positives: the data README leaves it out
    m.label_columns = findings
    split = patient_split(m.patients(), (0.6, 0.2, 0.2), seed=0)
    tr, va, te = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
    x = np.stack([pixel_vector(read_image(p).pixels) for p in m.paths()])
    y = m.labels().astype(np.float64)
    probe = fit_probe(x, y, tr, va, findings=findings)
    p_val, p_test = probe.predict_proba(x[va]), probe.predict_proba(x[te])
    labels_per_image = float(np.mean(np.nansum(y[te] == 1, axis=1)))
    old_calls = float(np.mean((p_test >= best_f1_thresholds(y[va], p_val)).sum(axis=1)))
    new_calls = float(np.mean((p_test >= probe.thresholds).sum(axis=1)))
    assert 1.5 < labels_per_image < 3.0
    assert old_calls > 0.3 * len(findings)           # the old rule: ~5 of 13 findings positive per image
    assert abs(new_calls - labels_per_image) < 0.75  # now: about as many as the labels
    rules = [c.rule for c in probe.threshold_choices]
    assert rules.count("prevalence") >= len(findings) // 2
    for c in probe.threshold_choices:  # every threshold carries its evidence
        assert c.finding in findings and c.n_val == len(va) and 0 <= c.prevalence <= 1 and c.reason


def test_no_validation_positives_gets_no_threshold_at_all():
    """NIH Hernia with 0 validation positives used to get a threshold of 1.28e-10 and keep it."""
    p = np.linspace(1e-10, 2e-10, 100)[:, None]
    (ch,) = choose_thresholds(np.zeros((100, 1)), p, "f1", prevalence=[0.002], findings=["Hernia"])
    assert ch.rule == "none" and np.isnan(ch.threshold) and "no validation positives" in ch.reason
    assert ch.val_call_rate == 0.0 and ch.to_dict()["threshold"] is None
    (neg,) = choose_thresholds(np.ones((100, 1)), p, "prevalence", prevalence=[0.5])
    assert neg.rule == "none" and "no validation negatives" in neg.reason
