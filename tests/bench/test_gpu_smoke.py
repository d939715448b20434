"""bench/gpu.py runs every section on a CPU with tiny sizes (a smoke test of its code paths: the GPU session
gets one prepared call), from a plain source tree as its docstring says (`PYTHONPATH=src python bench/gpu.py
--smoke --json s.json`, a fresh process without the test suite's imports). No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _run import run_bench


@pytest.mark.slow
def test_gpu_bench_smoke_writes_every_figure(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "gpu.json"
    run_bench("gpu", "--smoke", "--json", str(out), "--tmp", str(tmp_path), data=data_root)
    rep = json.loads(out.read_text())
    assert rep["errors"] == {} and rep["skipped"] == {}
    figs = rep["figures"]
    assert "fp32 matmul peak TFLOP/s" in figs
    fwd = [k for k in figs if k.startswith("forward")]
    assert len(fwd) == 2
    for k in fwd:
        rows = figs[k]
        assert {"reference (explicit attention)", "ours eager"} <= set(rows)
        assert rows["ours eager"]["img_s"] > 0 and rows["ours eager"]["max_rel_diff_vs_eager"] == 0
    assert {"PNG 8-bit 512 px (NIH)", "JPEG 224 px (Kermany)", "DICOM JPEG 2000 lossless"} <= set(
        figs["decode img/s per core (read + resize to 512 + min-max, uint8)"])
    embed = figs["embed end to end from 512-px PNG files"]
    for label in ("pooled file (embed --out)", "pooled file + token cache (--tokens)"):
        assert embed[label]["images"] == 12
        assert set(embed[label]["share_of_time"]) >= {"wait_for_data", "to_device_and_forward", "to_sinks"}
    heads = figs["head training from the token cache"]
    assert set(heads) == {"glori", "linear"} and heads["glori"]["grid_over_one"] > 0
    serve = figs["serve (Predictor, GLoRI head)"]["eager"]
    assert serve["batch1_p95_ms"] >= serve["batch1_p50_ms"] > 0 and serve["microbatch_img_s"] > 0
