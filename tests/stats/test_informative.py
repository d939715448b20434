"""The uninformative rule: stated thresholds, one place."""

from __future__ import annotations

import numpy as np

from chexfound.stats.informative import InformativePolicy, judge_finding, judge_head, logit_spread


def test_the_rules_and_their_thresholds():
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=300) < 0.3).astype(float)
    good = np.clip(0.2 + 0.5 * y + rng.normal(0, 0.15, 300), 0.01, 0.99)
    assert judge_finding(y, good, "A").informative
    # Near-random ranking.
    rand = rng.uniform(0.1, 0.9, 300)
    v = judge_finding(y, rand, "B")
    assert not v.informative and "near-random" in v.reasons[0] and v.val_auroc < 0.6
    # The quick demo's GLoRI head: Effusion 0.373-0.377 for every image, however well it ranks.
    flat = 0.375 + 0.002 * (good - 0.5)
    v = judge_finding(y, flat, "C")
    assert not v.informative and "barely vary" in v.reasons[-1] and v.logit_spread < 0.1
    assert logit_spread(flat) < InformativePolicy().min_logit_spread < logit_spread(good)
    # No validation positives (Hernia): no evidence at all; a handful: too little.
    assert judge_finding(np.zeros(300), good, "D").reasons == ["no validation positives"]
    few = y.copy()
    few[np.flatnonzero(y == 1)[3:]] = 0
    assert "too little evidence" in judge_finding(few, good, "E").reasons[0]
    # A stricter policy is a parameter, not an edit.
    assert not judge_finding(y, good, "A", InformativePolicy(min_auroc=0.999)).informative


def test_a_head_is_uninformative_when_none_of_its_findings_is():
    rng = np.random.default_rng(1)
    y = (rng.uniform(size=(200, 2)) < 0.3).astype(float)
    good = np.clip(0.2 + 0.5 * y + rng.normal(0, 0.1, y.shape), 0.01, 0.99)
    flat = np.full(y.shape, 0.3) + rng.normal(0, 1e-4, y.shape)
    assert judge_head(y, good, ["a", "b"])["informative"]
    mixed = np.stack([good[:, 0], flat[:, 1]], 1)
    v = judge_head(y, mixed, ["a", "b"])
    assert v["informative"] and [f["informative"] for f in v["findings"]] == [True, False]
    v = judge_head(y, flat, ["a", "b"])
    assert not v["informative"] and "none of its 2 findings" in v["reason"] and "rule" in v
