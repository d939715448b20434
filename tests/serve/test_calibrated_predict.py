"""On the shared NIH-14 images: `adapt` stores a calibrator and the informative verdicts in the head file,
`predict --manifest --split test` applies them (calibrated probabilities, no call for uninformative findings,
said once), and `evaluate --predictions` scores calls at the thresholds predict recorded."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from chexfound.cli.main import main
from chexfound.models.format import read_meta
from chexfound.stats.recalibration import CalibrationChoice, apply_binary

CHOICE_KEYS = set(CalibrationChoice.__dataclass_fields__)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    d = tmp_path_factory.mktemp("calib")
    df = pd.read_csv(data_root / "nih14" / "labels.csv").head(300)
    df["path"] = [str(data_root / "nih14" / p) for p in df["path"]]
    pats = df["patient_id"].astype(str).unique()
    order = {p: i % 5 for i, p in enumerate(pats)}  # patient-level: 2/5 train, 2/5 val, 1/5 test
    df["split"] = [("train", "train", "val", "val", "test")[order[p]] for p in df["patient_id"].astype(str)]
    df.to_csv(d / "nih.csv", index=False)
    from chexfound.models import create_backbone, save_backbone

    save_backbone(create_backbone("tiny_vit", seed=0).eval(), d / "backbone.safetensors")
    # A linear head barely trained (lr 1e-4, one epoch) on a random backbone: its probabilities are not at the
    # findings' prevalences (the calibrator moves them) and most findings rank near-randomly (no call for them).
    assert main(["adapt", "--backbone", str(d / "backbone.safetensors"), "--train", str(d / "nih.csv"),
                 "--head", "linear", "--avgpool",
                 "--epochs", "1", "--lrs", "1e-4", "--batch-size", "64", "--quiet", "--out", str(d / "run")]) == 0
    return d


def test_adapt_stores_the_calibrator_and_predict_applies_it(run, caplog):
    head = run / "run" / "linear.safetensors"
    meta = read_meta(head)
    cal = meta["calibration"]
    assert set(cal["methods"]) - {"none"}, cal["methods"]  # fitted where validation has >= 10 positives
    assert "cross-validated" in cal["rule"] and len(cal["findings"]) == len(meta["findings"])
    verdicts = {f["finding"]: f["informative"] for f in meta["informative"]["findings"]}
    off = [f for f, v in verdicts.items() if v is False]
    assert len(off) >= len(verdicts) // 2  # a random 64-px backbone: most findings near-random

    out = run / "preds.json"
    with caplog.at_level(logging.WARNING):
        assert main(["predict", "--backbone", str(run / "backbone.safetensors"), "--head", str(head),
                     "--manifest", str(run / "nih.csv"),
                     "--split", "test", "--out", str(out), "--quiet"]) == 0
    said = [r.getMessage() for r in caplog.records if "uninformative" in r.getMessage()]
    assert len(said) == 1 and all(f in said[0] for f in off)  # said once, not per image
    doc = json.loads(out.read_text())
    test_rows = pd.read_csv(run / "nih.csv").query("split == 'test'")
    assert len(doc["predictions"]) == len(test_rows)
    for r in doc["predictions"]:
        for f in r["findings"]:  # an uninformative finding is never called, an informative one always
            assert f["informative"] is verdicts[f["name"]]
            assert (f["positive"] is None) == (f["informative"] is False or f["threshold"] is None)
        assert set(r["positive"]).isdisjoint(off)
    assert [f["calibration"] for f in doc["predictions"][0]["findings"]] == cal["methods"]

    # The probabilities are the raw head's passed through the stored calibrators.
    from chexfound.serve import Predictor

    pred = Predictor(run / "backbone.safetensors", head, device="cpu")
    paths = [r["path"] for r in doc["predictions"][:4]]
    pred.head.calibration = None
    raw = np.stack([p.probabilities for p in pred.predict(paths)]).astype(np.float64)
    got = np.array([[f["probability"] for f in r["findings"]] for r in doc["predictions"][:4]])
    for c, f in enumerate(cal["findings"]):
        ch = CalibrationChoice(**{k: v for k, v in f.items() if k in CHOICE_KEYS})
        np.testing.assert_allclose(got[:, c], apply_binary(ch, raw[:, c]), atol=1e-5)
    run_doc = json.loads((run / "preds.run.json").read_text())
    assert run_doc["finding_policy"]["head"]["uninformative_findings"] == off


def test_evaluate_predictions_uses_the_recorded_thresholds(run, capsys):
    head = run / "run" / "linear.safetensors"
    out = run / "preds.csv"
    assert main(["predict", "--backbone", str(run / "backbone.safetensors"), "--head", str(head),
                 "--manifest", str(run / "nih.csv"),
                 "--split", "test", "--out", str(out), "--quiet"]) == 0
    header = out.read_text().splitlines()[0].split(",")
    assert header[-1] == "no_call"  # the findings predict made no call for, named in every row
    assert main(["evaluate", "--predictions", str(out), "--labels", str(run / "nih.csv"), "--split", "test",
                 "--bootstrap", "50", "--out", str(run / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "preds.run.json" in printed and "macro ECE" in printed
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert "preds.run.json" in m["thresholds_used"]["source"]
    # Where predict made no call there are no call metrics (not sensitivity 0.000 at 0.5); elsewhere the
    # recorded threshold is the one scored.
    no_call = set(pd.read_csv(out)["no_call"].iloc[0].split(";"))
    thr = read_meta(head)
    recorded = dict(zip(thr["findings"], thr["thresholds"]))
    per = m["per_finding"]
    for f, d in per.items():
        used = m["thresholds_used"]["values"][f]
        assert (used is None) == (f in no_call) and (d["sensitivity"] is None) == (used is None or d["n_pos"] == 0)
        if used is not None:
            assert used == pytest.approx(recorded[f], rel=1e-6)
        assert "brier" in d and "ece_ci" in d and "cal_slope" in d
        if d["n_pos"] < 5:  # the stated minimum: listed, left out of the macro, no CI
            assert f in m["excluded"] and d["auroc_ci"] == [None, None] and d["ece_ci"] == [None, None]
        else:
            assert d["brier_ci"][0] <= d["brier"] <= d["brier_ci"][1]
    assert m["macro"]["brier_ci"][0] <= m["macro"]["brier"] <= m["macro"]["brier_ci"][1]
    assert m["macro"]["ece_ci"][0] < m["macro"]["ece_ci"][1] and m["calibration"]["ece_bins"] == 10
    assert (run / "eval" / "figures" / "reliability.png").is_file() or any((run / "eval").rglob("reliability.png"))
