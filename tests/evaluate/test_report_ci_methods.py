"""`chexfound evaluate` records which bootstrap interval each calibration CI is and says so in the report."""

import json

import numpy as np
import pandas as pd

from chexfound.cli.main import main
from chexfound.stats.calibration import CI_METHODS
from chexfound.stats.resample import BIAS_CORRECTED, PERCENTILE, WIDENED


def test_metrics_and_report_name_the_calibration_intervals(tmp_path):
    rng = np.random.default_rng(0)
    n = 160  # 80 test patients with 2 images each: calibrated predictions
    p = rng.beta(1, 3, (n, 2))
    y = (rng.uniform(size=p.shape) < p).astype(float)
    man = pd.DataFrame({"path": [f"img/{i}.png" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)],
                        "split": "test", "Effusion": y[:, 0], "Mass": y[:, 1]})
    man.to_csv(tmp_path / "labels.csv", index=False)
    pd.DataFrame({"path": man["path"], "Effusion": p[:, 0], "Mass": p[:, 1]}).to_csv(tmp_path / "preds.csv",
                                                                                    index=False)
    out = tmp_path / "report"
    assert main(["evaluate", "--predictions", str(tmp_path / "preds.csv"), "--labels", str(tmp_path / "labels.csv"),
                 "--split", "test", "--out", str(out), "--bootstrap", "300", "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["calibration"]["ci_method"] == CI_METHODS
    for d in [m["macro"], *m["per_finding"].values()]:
        lo, hi = d["ece_ci"]
        assert lo <= d["ece"] <= hi
    md = (out / "report.md").read_text()
    assert f"ECE: {WIDENED}" in md and f"Brier, intercept: {PERCENTILE}" in md and f"slope: {BIAS_CORRECTED}" in md
    assert "calibration CIs:" in md
