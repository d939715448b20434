"""Scoring a predictions CSV against a manifest: row matching, clear errors, the metrics.json contract."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from chexfound.cli.main import main
from chexfound.data.manifest import read_manifest
from chexfound.errors import ManifestError
from chexfound.evaluate.score import match_predictions, read_predictions, read_thresholds


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    man = pd.DataFrame({"path": [f"img/{i}.png" for i in range(n)], "image_id": [f"{i}.png" for i in range(n)],
                        "patient_id": [f"p{i // 3}" for i in range(n)],
                        "split": ["train"] * 30 + ["test"] * 30,
                        "Effusion": (rng.random(n) < 0.4).astype(float),
                        "Pleural_Thickening": (rng.random(n) < 0.3).astype(float)})
    man.loc[5, "Effusion"] = np.nan
    man.loc[7, "Pleural_Thickening"] = -1
    man.to_csv(tmp_path / "labels.csv", index=False)
    preds = pd.DataFrame({"path": man["path"][::-1].to_numpy(),  # different order on purpose
                          "Effusion": rng.random(n), "Pleural Thickening": rng.random(n)})
    preds.to_csv(tmp_path / "preds.csv", index=False)
    return tmp_path, man, preds


def test_match_by_path_and_names(files):
    d, man, preds = files
    m = read_manifest(d / "labels.csv")
    mt = match_predictions(read_predictions(d / "preds.csv"), m, d / "preds.csv")
    assert mt.findings == ["Effusion", "Pleural_Thickening"] and mt.info["n_matched"] == 60
    assert mt.info["finding_columns"]["Pleural_Thickening"] == "Pleural Thickening"
    # the row for img/10.png carries that image's prediction
    i = list(man["path"]).index("img/10.png")
    assert mt.p[i, 0] == preds.set_index("path").loc["img/10.png", "Effusion"]


def test_match_by_absolute_path_and_file_name(files, tmp_path):
    d, man, preds = files
    m = read_manifest(d / "labels.csv")
    absolute = preds.assign(path=[str(d / p) for p in preds["path"]])
    assert match_predictions(absolute, m, d / "x.csv").info["matched_by"] == "absolute path"
    names = preds.assign(path=[p.split("/")[-1] for p in preds["path"]])
    assert match_predictions(names, m, tmp_path / "elsewhere" / "x.csv").info["matched_by"] == "file name"


def test_clear_errors(files):
    d, man, preds = files
    m = read_manifest(d / "labels.csv")
    with pytest.raises(ManifestError, match="2 of 60 manifest row"):
        match_predictions(preds.iloc[2:], m, d / "preds.csv")
    assert match_predictions(preds.iloc[2:], m, d / "p.csv", allow_missing=True).info["n_missing"] == 2
    with pytest.raises(ManifestError, match="no probability column for finding"):
        match_predictions(preds.drop(columns=["Effusion"]), m, d / "p.csv", findings=["Effusion"])
    with pytest.raises(ManifestError, match="duplicated"):
        match_predictions(pd.concat([preds, preds.iloc[:1]]), m, d / "p.csv")
    bad = preds.copy()
    bad.loc[3, "Effusion"] = np.nan
    with pytest.raises(ManifestError, match="non-finite"):
        match_predictions(bad, m, d / "p.csv")
    (d / "noid.csv").write_text("x,Effusion\n1,0.5\n")
    with pytest.raises(ManifestError, match="id column"):
        read_predictions(d / "noid.csv")


def test_thresholds_file(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"thresholds": {"Effusion": 0.3, "Pleural Thickening": 0.2}}))
    assert read_thresholds(tmp_path / "t.json", ["Effusion", "Pleural_Thickening"]).tolist() == [0.3, 0.2]
    with pytest.raises(ManifestError, match="no threshold"):
        read_thresholds(tmp_path / "t.json", ["Mass"])


def test_cli_scores_predictions(files, capsys):
    d, man, preds = files
    out = d / "report"
    rc = main(["evaluate", "--predictions", str(d / "preds.csv"), "--labels", str(d / "labels.csv"),
               "--split", "test", "--out", str(out), "--bootstrap", "200", "--quiet"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    test = man[man["split"] == "test"]
    p = preds.set_index("path").loc[test["path"]]
    assert m["per_finding"]["Effusion"]["auroc"] == pytest.approx(roc_auc_score(test["Effusion"], p["Effusion"]))
    pt = test["Pleural_Thickening"].to_numpy()
    keep = pt >= 0  # -1 (uncertain) is ignored by default
    assert m["per_finding"]["Pleural_Thickening"]["n"] == keep.sum()
    for f in ("Effusion", "Pleural_Thickening"):
        pf = m["per_finding"][f]
        assert {"auroc", "ap", "auroc_ci", "n_pos"} <= set(pf) and len(pf["auroc_ci"]) == 2
        assert pf["group"] in ("head", "medium", "tail")  # train rows of the manifest give the groups
    assert {"auroc", "ap"} <= set(m["macro"]) and m["provenance"]["labels"]["sha256"]
    assert (out / "report.html").is_file() and (out / "figures" / "roc.png").stat().st_size > 1000
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temp files


def test_cli_errors_exit_2(files, capsys):
    d, _, _ = files
    rc = main(["evaluate", "--predictions", str(d / "nope.csv"), "--labels", str(d / "labels.csv"), "--out",
               str(d / "o")])
    assert rc == 2 and "predictions file not found" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(d / "o")]) == 2


def test_cli_multiclass_regression_survival(tmp_path):
    from sklearn.metrics import r2_score

    from chexfound.stats import concordance_index

    rng = np.random.default_rng(0)
    n = 90
    cls = rng.integers(0, 3, n)
    man = pd.DataFrame({"path": [f"{i}.png" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)],
                        "normal": (cls == 0).astype(float), "bacteria": (cls == 1).astype(float),
                        "virus": (cls == 2).astype(float), "age": rng.normal(50, 10, n),
                        "time": rng.integers(1, 100, n).astype(float), "event": rng.integers(0, 2, n).astype(float)})
    man.to_csv(tmp_path / "m.csv", index=False)
    logits = rng.normal(size=(n, 3)) + 2 * np.eye(3)[cls]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    preds = pd.DataFrame({"path": man["path"], "normal": prob[:, 0], "bacteria": prob[:, 1], "virus": prob[:, 2],
                          "age": man["age"] + rng.normal(0, 5, n), "risk": -man["time"] + rng.normal(0, 30, n)})
    preds.to_csv(tmp_path / "p.csv", index=False)
    common = ["evaluate", "--predictions", str(tmp_path / "p.csv"), "--labels", str(tmp_path / "m.csv"),
              "--bootstrap", "50", "--quiet"]
    assert main(common + ["--kind", "multiclass", "--findings", "normal,bacteria,virus",
                          "--out", str(tmp_path / "mc")]) == 0
    m = json.loads((tmp_path / "mc" / "metrics.json").read_text())
    assert m["multiclass"]["accuracy"] == pytest.approx(np.mean(prob.argmax(1) == cls))
    lo, hi = m["multiclass"]["accuracy_ci"]
    assert lo <= m["multiclass"]["accuracy"] <= hi
    assert m["macro"]["auroc"] == pytest.approx(roc_auc_score(cls, prob, multi_class="ovr"))
    assert main(common + ["--kind", "regression", "--targets", "age", "--out", str(tmp_path / "rg")]) == 0
    r = json.loads((tmp_path / "rg" / "metrics.json").read_text())["regression"]["age"]
    assert r["r2"] == pytest.approx(r2_score(man["age"], preds["age"])) and len(r["mae_ci"]) == 2
    assert main(common + ["--kind", "survival", "--targets", "time,event", "--out", str(tmp_path / "sv")]) == 0
    s = json.loads((tmp_path / "sv" / "metrics.json").read_text())["survival"]
    assert s["c_index"] == pytest.approx(concordance_index(man["time"], man["event"], preds["risk"])["c_index"])
    assert s["c_index"] > 0.6 and s["c_index_ci"][0] < s["c_index"] < s["c_index_ci"][1]
    assert main(common + ["--kind", "survival", "--targets", "time", "--out", str(tmp_path / "x")]) == 2


def test_predict_json_and_cwd_relative_paths(files, monkeypatch):
    d, man, preds = files
    doc = {"predictions": [{"path": f"data/{r.path}", "findings": [
        {"name": "Effusion", "probability": r.Effusion, "threshold": 0.5},
        {"name": "Pleural Thickening", "probability": r._3, "threshold": 0.5}]} for r in preds.itertuples()]}
    (d / "out").mkdir()
    (d / "out" / "p.json").write_text(json.dumps(doc))
    (d / "data").symlink_to(d)  # `predict` ran in d with paths data/img/N.png
    monkeypatch.chdir(d)
    mt = match_predictions(read_predictions(d / "out" / "p.json"), read_manifest(d / "labels.csv"), d / "out" / "p.json")
    assert mt.info["n_matched"] == 60 and mt.info["matched_by"] == "absolute path"
    i = list(man["path"]).index("img/10.png")
    assert mt.p[i, 0] == preds.set_index("path").loc["img/10.png", "Effusion"]


def test_cli_leaves_rare_findings_out_of_macro_figures_and_uses_recorded_thresholds(files, capsys):
    """A finding with fewer test positives than the stated minimum (5) is listed but not in the macro and has no
    CI; calls are scored at the thresholds `predict` recorded beside the file, and the run says which."""
    d, man, preds = files
    lab = man.copy()
    test = lab.index[lab["split"] == "test"]
    lab.loc[test, "Pleural_Thickening"] = 0.0
    lab.loc[test[:2], "Pleural_Thickening"] = 1.0  # 2 test positives
    lab.to_csv(d / "rare.csv", index=False)
    run = {"finding_policy": {"findings": [
        {"name": "Effusion", "threshold": 0.25, "called": True},
        {"name": "Pleural_Thickening", "threshold": 0.7, "called": False}]}}
    (d / "preds.run.json").write_text(json.dumps(run))
    out = d / "rare"
    assert main(["evaluate", "--predictions", str(d / "preds.csv"), "--labels", str(d / "rare.csv"), "--split",
                 "test", "--out", str(out), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    pt = m["per_finding"]["Pleural_Thickening"]
    assert m["excluded"] == ["Pleural_Thickening"] and m["macro"]["n_findings"] == 1
    assert pt["n_pos"] == 2 and pt["auroc_ci"] == [None, None] and pt["ece_ci"] == [None, None]
    assert m["macro"]["auroc"] == pytest.approx(m["per_finding"]["Effusion"]["auroc"])
    assert "not scored (< 5 test positives): Pleural_Thickening" in printed and "preds.run.json" in printed
    assert m["thresholds_used"]["values"] == {"Effusion": 0.25, "Pleural_Thickening": None}
    assert m["per_finding"]["Effusion"]["threshold"] == 0.25 and pt["sensitivity"] is None  # predict made no call
    # --thresholds default scores at 0.5 instead; --min-pos 1 puts the rare finding back.
    assert main(["evaluate", "--predictions", str(d / "preds.csv"), "--labels", str(d / "rare.csv"), "--split",
                 "test", "--out", str(out), "--bootstrap", "0", "--thresholds", "default", "--min-pos", "1",
                 "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["per_finding"]["Effusion"]["threshold"] == 0.5 and m["excluded"] == []
    assert "0.5 for every finding" in m["thresholds_used"]["source"]
