"""bench/pretrain.py runs end to end (a smoke test on a tiny recipe: the figures are not checked, only that
every one is produced)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_pretrain_smoke(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ssl_conftest", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the tiny recipe's overrides (TINY)
    out = tmp_path / "bench.json"
    over = [x for x in mod.TINY if x.startswith(("student.", "dino.", "ibot.", "crops."))]
    cmd = [sys.executable, str(ROOT / "bench" / "pretrain.py"), "--config", "demo_tiny", "--batch", "4",
           "--steps", "1", "--rounds", "1", "--warmup", "1", "--threads", "1", "--reference",
           "--profile", str(tmp_path / "prof"), "--json", str(out), *over]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["peak_tflops"]["bf16"] > 0 and res["peak_tflops"]["fp32"] > 0
    (row,) = res["results"]
    assert row["gflop_per_image"] > 0 and set(row["variants"]) == {"step", "reference"}
    assert row["variants"]["step"]["images_per_s"] > 0 and row["step_vs_reference"] > 0
    assert row["syncs"]["step"]["operators"] < row["syncs"]["reference"]["operators"]
    assert {"backward", "student", "teacher", "optimizer", "ema", "augment", "masks"} <= set(row["sections"]["step"])
    assert (tmp_path / "prof" / "demo_tiny" / "ops_step.txt").is_file()
    assert "images/s" in r.stdout and "% bf16 pk" in r.stdout
