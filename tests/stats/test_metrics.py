"""Metrics against scikit-learn and hand-computed cases."""

import math

import numpy as np
import pytest
from sklearn.metrics import (average_precision_score, balanced_accuracy_score, mean_absolute_error, r2_score,
                             roc_auc_score)

from chexfound.stats import (EligibilityRule, RankedScores, average_precision, binary_auroc, concordance_index,
                             multiclass_metrics, multilabel_metrics, regression_metrics, threshold_metrics)


def test_hand_computed_auroc_ap():
    # scores ranked: 0.9(+) 0.8(-) 0.7(+) 0.1(-): pos-neg pairs (0.9>0.8, 0.9>0.1, 0.7<0.8, 0.7>0.1) -> 3/4
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.7, 0.1])
    assert binary_auroc(y, s) == pytest.approx(0.75)
    # AP = 1/2 * P@1 + 1/2 * P@3 = 0.5 * 1 + 0.5 * 2/3
    assert average_precision(y, s) == pytest.approx(0.5 + 1 / 3)
    # tie between a positive and a negative counts 1/2
    assert binary_auroc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_ap_match_sklearn_with_ties_and_weights(seed):
    rng = np.random.default_rng(seed)
    n = 200
    y = (rng.random(n) < 0.3).astype(float)
    s = np.round(rng.random(n) + 0.5 * y, 1)  # rounding makes many ties
    w = rng.integers(0, 4, n).astype(float)
    assert binary_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert binary_auroc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    assert average_precision(y, s, w) == pytest.approx(average_precision_score(y, s, sample_weight=w), abs=1e-12)


def test_integer_weights_equal_duplication():
    rng = np.random.default_rng(1)
    y = (rng.random(50) < 0.4).astype(float)
    s = rng.random(50)
    w = rng.integers(0, 3, 50)
    r = RankedScores(y, s)
    auc_w, ap_w = r.auroc_ap(w[None].astype(float))
    yy, ss = np.repeat(y, w), np.repeat(s, w)
    assert auc_w[0] == pytest.approx(roc_auc_score(yy, ss))
    assert ap_w[0] == pytest.approx(average_precision_score(yy, ss))


def test_undefined_cases_are_nan():
    assert math.isnan(binary_auroc([1, 1, np.nan], [0.1, 0.2, 0.3]))
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))
    with pytest.raises(ValueError):
        binary_auroc([1, 0], [np.nan, 0.2])


def test_nan_labels_are_masked_not_negative():
    y = np.array([1, 0, np.nan, np.nan])
    s = np.array([0.9, 0.1, 0.95, 0.0])
    assert binary_auroc(y, s) == 1.0
    m = multilabel_metrics(y[:, None], s[:, None], ["A"])
    assert m["per_finding"]["A"]["n"] == 2 and m["per_finding"]["A"]["n_pos"] == 1


def test_threshold_metrics_hand_computed():
    y = np.array([1, 1, 1, 0, 0, np.nan])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.99])
    t = threshold_metrics(y, s, 0.5)
    # tp=2 fn=1 fp=1 tn=1
    assert (t["tp"], t["fn"], t["fp"], t["tn"]) == (2, 1, 1, 1)
    assert t["sensitivity"] == pytest.approx(2 / 3)
    assert t["specificity"] == pytest.approx(1 / 2)
    assert t["precision"] == pytest.approx(2 / 3)
    assert t["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_multilabel_macro_micro_match_sklearn_and_rule():
    rng = np.random.default_rng(3)
    n, c = 120, 4
    y = (rng.random((n, c)) < [0.5, 0.2, 0.1, 0.0]).astype(float)
    y[0, 3] = 1  # finding D: exactly one positive
    p = rng.random((n, c)) * 0.5 + 0.5 * y
    names = ["A", "B", "C", "D"]
    m = multilabel_metrics(y, p, names)
    assert m["eligible"] == names
    assert m["macro"]["auroc"] == pytest.approx(roc_auc_score(y, p, average="macro"))
    assert m["macro"]["ap"] == pytest.approx(average_precision_score(y, p, average="macro"))
    assert m["micro"]["auroc"] == pytest.approx(roc_auc_score(y, p, average="micro"))
    assert m["micro"]["ap"] == pytest.approx(average_precision_score(y, p, average="micro"))
    strict = multilabel_metrics(y, p, names, rule=EligibilityRule(min_pos=2))
    assert strict["excluded"] == ["D"] and math.isnan(strict["per_finding"]["D"]["auroc"])
    assert strict["macro"]["auroc"] == pytest.approx(roc_auc_score(y[:, :3], p[:, :3], average="macro"))
    assert strict["macro"]["n_findings"] == 3


def test_regression_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.normal(size=40)
    pred = y + rng.normal(scale=0.3, size=40)
    r = regression_metrics(np.r_[y, np.nan], np.r_[pred, 5.0])
    assert r["n"] == 40
    assert r["mae"] == pytest.approx(mean_absolute_error(y, pred))
    assert r["r2"] == pytest.approx(r2_score(y, pred))


def test_concordance_index_hand_computed():
    t = np.array([1.0, 2.0, 3.0, 4.0])
    e = np.array([1, 1, 0, 1])
    risk = np.array([0.9, 0.5, 0.7, 0.1])
    # comparable (i event, t_i < t_j): (0,1) (0,2) (0,3) (1,2) (1,3); (3,*) none later.
    # concordant: 0>1 yes, 0>2 yes, 0>3 yes, 1>2 no (0.5<0.7), 1>3 yes -> 4/5
    c = concordance_index(t, e, risk)
    assert c["comparable_pairs"] == 5 and c["c_index"] == pytest.approx(0.8)
    assert concordance_index(t, e, -risk)["c_index"] == pytest.approx(0.2)
    assert concordance_index(t, e, np.zeros(4))["c_index"] == pytest.approx(0.5)


def test_concordance_blocks_agree_with_bruteforce():
    rng = np.random.default_rng(5)
    n = 300
    t = rng.integers(1, 50, n).astype(float)
    e = rng.random(n) < 0.6
    r = np.round(rng.random(n), 2)
    num = den = 0.0
    for i in range(n):
        for j in range(n):
            if e[i] and t[i] < t[j]:
                den += 1
                num += 1.0 if r[i] > r[j] else (0.5 if r[i] == r[j] else 0.0)
    assert concordance_index(t, e, r, block=7)["c_index"] == pytest.approx(num / den)


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(2)
    n, k = 90, 3
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = multiclass_metrics(y, prob, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(np.mean(prob.argmax(1) == y))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, prob.argmax(1)))
    assert m["macro"]["auroc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))


def test_ranked_scores_with_no_rows_give_nan_not_an_error():
    from chexfound.stats.ranking import RankedScores

    auroc, ap = RankedScores(np.zeros(0), np.zeros(0)).auroc_ap(np.ones((2, 0)))
    assert auroc.shape == (2,) and np.all(np.isnan(auroc)) and np.all(np.isnan(ap))
