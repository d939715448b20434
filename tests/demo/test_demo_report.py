"""The demo's report sentences and paired table from a results.json reloaded on a rerun."""

import json

from chexfound.demo.report import paired_rows, verdicts
from chexfound.runio import json_safe


def _results(ci: list[float], diff: float) -> dict:
    paired = {"nih14: pretrained - random (glori)": {"macro": {"auroc": {"diff": diff, "ci": ci, "p_value": 0.04}}},
              "kermany: pretrained - pixels (linear)": {"error": "no test positives"}}
    # Through JSON as a rerun reads it: NaN is written as null.
    return json.loads(json.dumps(json_safe({"paired": paired})))


def test_a_reloaded_nan_ci_neither_crashes_nor_makes_a_claim():
    res = _results([float("nan"), float("nan")], float("nan"))
    assert res["paired"]["nih14: pretrained - random (glori)"]["macro"]["auroc"]["ci"] == [None, None]
    rows = paired_rows(res)
    assert list(rows["comparison"]) == ["nih14: pretrained - random (glori)", "kermany: pretrained - pixels (linear)"]
    assert rows.iloc[0]["CI excludes 0"] == "no"
    assert verdicts(res) == []


def test_verdicts_follow_the_ci():
    assert "the first is better" in verdicts(_results([0.01, 0.05], 0.03))[0]
    assert "WORSE" in verdicts(_results([-0.05, -0.01], -0.03))[0]
    assert "no clear difference" in verdicts(_results([-0.01, 0.05], 0.02))[0]
    assert paired_rows(_results([0.01, 0.05], 0.03)).iloc[0]["CI excludes 0"] == "yes"
