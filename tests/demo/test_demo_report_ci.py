"""The demo's report names the bootstrap interval of each calibration CI from the heads' metrics."""

import json

from chexfound.demo.report import calibration_ci_methods
from chexfound.runio import json_safe
from chexfound.stats.calibration import CI_METHODS
from chexfound.stats.resample import BIAS_CORRECTED, PERCENTILE, WIDENED


def _results(calibration: dict) -> dict:
    head = {"metrics": {"macro": {"ece": 0.05, "ece_ci": [0.05, 0.09]}, "calibration": calibration}}
    return json.loads(json.dumps(json_safe({"models": {"pretrained/nih14": {"heads": {"glori": head}},
                                                       "pixels/kermany": head}})))


def test_the_calibration_intervals_are_named():
    text = calibration_ci_methods(_results({"ece_bins": 10, "ci_method": dict(CI_METHODS)}))
    assert f"ECE: {WIDENED}" in text and f"slope: {BIAS_CORRECTED}" in text
    assert f"Brier, intercept: {PERCENTILE}" in text
    # A results.json written before the summary recorded its intervals: nothing is claimed.
    assert calibration_ci_methods(_results({"ece_bins": 10})) == ""
