import numpy as np
import pytest

from chexfound.evaluate.groups import GroupConfig, group_means, prevalence_groups, training_frequencies


def _train():
    n = 1000
    y = np.zeros((n, 4))
    y[:300, 0] = 1   # 30 %   -> head
    y[:50, 1] = 1    # 5 %    -> medium
    y[:10, 2] = 1    # 1 %    -> tail (at the threshold)
    y[:, 3] = np.nan
    y[:100, 3] = 1   # 100 positives of 100 labelled -> 100 % (NaN rows are not labelled)
    return y


def test_frequency_groups():
    y = _train()
    g = prevalence_groups(y, ["A", "B", "C", "D"])
    assert g == {"head": ["A", "D"], "medium": ["B"], "tail": ["C"]}
    assert training_frequencies(y, ["A", "B", "C", "D"])["D"]["frequency"] == 1.0


def test_count_groups_and_validation():
    g = prevalence_groups(_train(), ["A", "B", "C", "D"], GroupConfig(by="count", head=99, tail=10))
    assert g == {"head": ["A", "D"], "medium": ["B"], "tail": ["C"]}
    with pytest.raises(ValueError):
        GroupConfig(head=0.01, tail=0.1)


def test_group_means_skip_ineligible():
    per = {"A": {"auroc": 0.8, "ap": 0.5}, "B": {"auroc": 0.6, "ap": 0.1},
           "C": {"auroc": float("nan"), "ap": float("nan"), "eligible": False}}
    m = group_means(per, {"head": ["A", "B"], "tail": ["C"]})
    assert m["head"]["auroc"] == pytest.approx(0.7) and m["head"]["n_eligible"] == 2
    assert np.isnan(m["tail"]["auroc"]) and m["tail"]["n_eligible"] == 0
