"""bench/pretrain.py runs end to end (its --smoke mode: a tiny recipe; the figures are not checked, only that
every one is produced), from a plain source tree as a user runs it: a fresh process without the test suite's
imports (`run_bench`: PYTHONPATH=src, no tiny configs registered for it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_pretrain_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "bench"))
    from _run import run_bench

    out = tmp_path / "bench.json"
    r = run_bench("pretrain", "--smoke", "--profile", str(tmp_path / "prof"), "--json", str(out))
    res = json.loads(out.read_text())
    assert res["peak_tflops"]["bf16"] > 0 and res["peak_tflops"]["fp32"] > 0
    (row,) = res["results"]
    assert row["gflop_per_image"] > 0 and set(row["variants"]) == {"step", "reference"}
    assert row["variants"]["step"]["images_per_s"] > 0 and row["step_vs_reference"] > 0
    assert row["syncs"]["step"]["operators"] < row["syncs"]["reference"]["operators"]
    assert {"backward", "student", "teacher", "optimizer", "ema", "augment", "masks"} <= set(row["sections"]["step"])
    assert (tmp_path / "prof" / "demo_tiny" / "ops_step.txt").is_file()
    assert "images/s" in r.stdout and "% bf16 pk" in r.stdout
