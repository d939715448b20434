"""`chexfound demo --quick` end to end on the real shared data (the CI smoke run of the main job)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chexfound.cli.main import main


@pytest.mark.slow
def test_demo_quick_runs_resumes_and_reports(data_root, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--data", str(data_root), "--out", str(out), "--pretrain-budget", "20",
            "--n-boot", "100"]
    assert main(args) == 0
    first = capsys.readouterr().out
    # The report and every model the README lists are there, ready for predict/serve.
    for f in ("report.html", "report.json", "metrics.json", "figures/label_efficiency.png"):
        assert (out / f).is_file(), f
    for which in ("pretrained", "random"):
        for f in ("backbone.safetensors", "nih14-glori.safetensors", "nih14-linear.safetensors",
                  "kermany-linear.safetensors"):
            assert (out / "models" / which / f).is_file(), (which, f)
    assert list((out / "heatmaps").glob("*.png"))
    rep = json.loads((out / "report.json").read_text())
    auc = rep["models"]["pretrained/kermany"]["heads"]["linear"]["metrics"]["macro"]["auroc"]
    lo, hi = rep["models"]["pretrained/kermany"]["heads"]["linear"]["metrics"]["macro"]["auroc_ci"]
    assert 0.0 <= lo <= auc <= hi <= 1.0
    # Every model has its card; a head's card carries the test numbers the report has for it.
    for which in ("pretrained", "random"):
        for f in ("backbone", "nih14-glori", "nih14-linear", "kermany-linear"):
            assert "**Not for clinical use.**" in (out / "models" / which / f"{f}.md").read_text(), (which, f)
    card = (out / "models" / "pretrained" / "kermany-linear.md").read_text()
    assert f"| macro | {auc:.4f} | [{lo:.4f}, {hi:.4f}] |" in card
    # The baselines are always reported next to the pretrained model.
    assert {"random/kermany", "pixels/kermany", "pixels/nih14"} <= set(rep["models"])
    comp = rep["comparison"]["kermany"]
    assert comp["difference"] == "model - reference" and "pretrained (linear) - random (linear)" in comp["paired"]
    assert "pretrained (linear) - random (linear)" in first
    # No evaluation image was used for pretraining.
    import pandas as pd

    pre = set(pd.read_csv(out / "data" / "pretrain.csv")["path"])
    for name in ("kermany", "nih14"):
        m = pd.read_csv(out / "data" / f"{name}.csv")
        assert not pre & set(m.loc[m["split"] == "test", "path"])
    # A rerun resumes: every stage is skipped and the numbers are identical.
    assert main(args) == 0
    second = capsys.readouterr().out
    assert "already done" in second and "[pretrain] self-supervised" not in second
    rep2 = json.loads((out / "report.json").read_text())
    assert np.isclose(rep2["models"]["pretrained/kermany"]["heads"]["linear"]["metrics"]["macro"]["auroc"], auc)
