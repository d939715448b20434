"""bench/precision.py on a tiny model: every figure the JSON promises is written (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_precision_bench_smoke(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHEXFOUND_DATA", str(data_root))
    spec = importlib.util.spec_from_file_location("bench_precision", REPO / "bench" / "precision.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_precision", mod)
    spec.loader.exec_module(mod)
    out = tmp_path / "precision.json"
    assert mod.main(["--smoke", "--json", str(out)]) == 0
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
