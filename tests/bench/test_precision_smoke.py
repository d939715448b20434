"""bench/precision.py on a tiny model, run as a user runs it (`PYTHONPATH=src python bench/precision.py --smoke`,
a fresh process): every figure the JSON promises is written (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from _run import run_bench


def test_precision_bench_smoke(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "precision.json"
    run_bench("precision", "--smoke", "--json", str(out), data=data_root)
    rep = json.loads(out.read_text())
    r = rep["tiny_vit_mlp"]
    assert set(r["img_s"]) == {"original_fp32", "fp32", "bf16", "int8"} and min(r["img_s"].values()) > 0
    # our fp32 computes the original's function; bf16/int8 stay close to it on real images
    assert r["original_vs_fp32_cls_cosine"] > 0.9999
    for k in ("bf16", "int8"):
        assert 0.99 < r["cls_cosine"][k] <= 1.0 + 1e-6 and 0.99 < r["patch_cosine_mean"][k] <= 1.0 + 1e-6
        assert 0 <= r["max_prob_diff"][k] < 0.2
    assert r["weights_mb"]["int8"] < r["weights_mb"]["fp32"]
    k = rep["kermany"]
    assert k["test_images"] == 24 and set(k["auroc"]) == {"fp32", "bf16", "int8"}
    for p in ("bf16", "int8"):
        d = k["diff_vs_fp32"][p]
        assert d["ci"][0] <= d["diff"] <= d["ci"][1]
    assert any("int8" in line for line in rep["verdicts"])
