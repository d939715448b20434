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


def _head(auroc_ci, informative, ece_before=None, ece_after=(0.05, [0.03, 0.07])):
    mac = {"auroc": sum(auroc_ci) / 2, "auroc_ci": auroc_ci, "ece": ece_after[0], "ece_ci": ece_after[1],
           "brier": 0.1, "brier_ci": [0.09, 0.11], "cal_slope": 0.9}
    metrics = {"macro": mac}
    if ece_before:
        metrics["calibration_before"] = {"macro": {"ece": ece_before[0], "ece_ci": ece_before[1], "brier": 0.2,
                                                   "brier_ci": [0.18, 0.22]}, "max_abs_auroc_change": 0.0}
    return {"metrics": metrics, "informative": informative, "calibration": ["temperature", "none"]}


def test_the_report_says_in_words_what_its_numbers_show():
    from chexfound.demo.report import calibration_rows, what_the_numbers_show

    flat = {"informative": False, "reason": "none of its 13 findings is informative on validation",
            "uninformative_findings": ["Effusion"], "mean_logit_spread": 0.0021}
    results = json.loads(json.dumps(json_safe({
        "models": {"pretrained/nih14": {"heads": {
            "glori": _head([0.45, 0.60], flat, ece_before=(0.20, [0.17, 0.24])),
            "linear": _head([0.62, 0.70], {"informative": True, "uninformative_findings": ["Hernia"]})}}},
        "localisation": {"pretrained": {"overall": {"n_items": 128, "pointing": 0.0, "pointing_ci": [0.0, 0.0],
                                                    "centre_pointing": 0.188, "centre_pointing_ci": [0.12, 0.26]}}},
    })))
    said = what_the_numbers_show(results)
    text = " ".join(said)
    assert "nih14 glori (pretrained): test macro AUROC" in text and "includes chance" in text
    assert "is uninformative" in text and "0.0021" in text and "call no finding" in text
    assert "1 finding(s) get no call" in text and "Hernia" in text
    assert "0.200 [0.170, 0.240] before" in text and "the calibrator helped" in text
    assert "in 0 of 128 test boxes" in text and "0.188" in text and "does not point at findings" in text
    assert not any("nih14 linear (pretrained): test macro AUROC" in s for s in said)  # its CI excludes 0.5
    rows = calibration_rows(results)
    assert list(rows["head"]) == ["glori", "linear"] and rows.iloc[0]["test ECE before [95% CI]"].startswith("0.200")
