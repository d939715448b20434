"""The demo's report sentences and paired table from a results.json reloaded on a rerun."""

import json

from chexfound.demo.report import paired_rows, verdicts
from chexfound.runio import json_safe
from chexfound.stats import Comparison, Difference, ModelResult, PairedDifference


def _results(ci: list[float], diff: float) -> dict:
    models = {k: ModelResult(0.7, (0.6, 0.8)) for k in ("pretrained (GLoRI)", "random (GLoRI)")}
    nih = Comparison(["A", "B"], models)
    nih.add(PairedDifference("pretrained (GLoRI)", "random (GLoRI)",
                             {"auroc": Difference(0.7, 0.7 - diff, diff, tuple(ci), 0.04)}))
    ker = Comparison(["PNEUMONIA"], {k: ModelResult(0.7) for k in ("pretrained (linear)", "pixels (logistic)")})
    ker.add(PairedDifference("pretrained (linear)", "pixels (logistic)", error="no test positives"))
    comparison = {"nih14": nih.to_dict(), "kermany": ker.to_dict()}
    # Through JSON as a rerun reads it: NaN is written as null.
    return json.loads(json.dumps(json_safe({"comparison": comparison})))


def test_a_reloaded_nan_ci_neither_crashes_nor_makes_a_claim():
    res = _results([float("nan"), float("nan")], float("nan"))
    pair = res["comparison"]["nih14"]["paired"]["pretrained (GLoRI) - random (GLoRI)"]
    assert pair["macro"]["auroc"]["ci"] == [None, None]
    rows = paired_rows(res)
    assert list(rows["comparison"]) == ["nih14: pretrained (GLoRI) - random (GLoRI)",
                                        "kermany: pretrained (linear) - pixels (logistic)"]
    assert rows.iloc[0]["CI excludes 0"] == "no"
    assert verdicts(res) == []


def test_verdicts_follow_the_ci():
    assert "the first is better" in verdicts(_results([0.01, 0.05], 0.03))[0]
    assert "WORSE" in verdicts(_results([-0.05, -0.01], -0.03))[0]
    assert "no clear difference" in verdicts(_results([-0.01, 0.05], 0.02))[0]
    assert paired_rows(_results([0.01, 0.05], 0.03)).iloc[0]["CI excludes 0"] == "yes"
