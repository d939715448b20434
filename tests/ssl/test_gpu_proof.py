"""The GPU proof command end to end on the CPU: `make gpu-proof` from the source tree, with pydicom and fastapi
made unimportable (the device machine has neither), a tiny ViT at 64 px and a few iterations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from chexfound.ssl.gpu_proof import MAX_FILE_BYTES, MAX_FILES, verdict

REPO = Path(__file__).resolve().parents[2]
TINY = ["student.arch=tiny_vit", "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
        "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
        "crops.global_crops_size=64", "crops.local_crops_size=32", "crops.local_crops_number=2",
        "train.batch_size_per_gpu=8", "train.time_budget_s=null", "optim.epochs=2", "train.epoch_length=2",
        "train.dtype=fp32", "train.log_every=1", "data.num_workers=0", "probe.n_train=30", "probe.n_test=30",
        "probe.n_evals=1", "probe.final_n_train=60", "probe.final_n_test=60", "probe.batch_size=32",
        "probe.n_jobs=1", "checkpoint.export_bf16_shard_mib=0.25"]


@pytest.mark.slow
def test_make_gpu_proof_gathers_the_files_and_prints_a_verdict(tmp_path, tiny_corpus, data_root):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nfor m in ('pydicom', 'fastapi'):\n    sys.modules[m] = None\n")
    env = {**os.environ, "PYTHONPATH": str(block), "CHEXFOUND_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    blocked = subprocess.run([sys.executable, "-c", "import pydicom"], env=env, capture_output=True)
    assert blocked.returncode != 0  # the block works
    proof, run = tmp_path / "proof", tmp_path / "run"
    args = " ".join([*TINY, "--device", "cpu", "--quiet", "--data", str(tiny_corpus), "--out", str(run)])
    r = subprocess.run(["make", "-s", "-C", str(REPO), "gpu-proof", f"OUT={proof}", f"PYTHON={sys.executable}",
                        f"ARGS={args}"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "GPU proof verdict" in r.stdout and "=> " in r.stdout

    files = sorted(proof.iterdir())
    names = [f.name for f in files]
    shards = [n for n in names if n.startswith("teacher_backbone.")]
    assert len(shards) >= 2 and set(names) == {*shards, "proof.tar.gz", "verdict.json"}
    assert len(files) <= MAX_FILES and all(f.stat().st_size <= MAX_FILE_BYTES for f in files)
    with tarfile.open(proof / "proof.tar.gz") as tar:
        assert set(tar.getnames()) == {"metrics.jsonl", "config.yaml", "probe_comparison.json", "report.png",
                                       "pretrain.log", "verdict.txt"}
        assert "GPU proof verdict" in tar.extractfile("verdict.txt").read().decode()

    v = json.loads((proof / "verdict.json").read_text())
    assert set(v["tasks"]) == {"kermany", "nih14"}
    for t in v["tasks"].values():
        assert set(t["vs"]) == {"init", "random_seed0", "random_seed1", "random_seed2", "pixels"}
        for x in t["vs"].values():
            lo, hi = x["ci95"]
            assert x["result"] == ("beats" if lo > 0 else "loses" if hi < 0 else "ties")
    assert v["passed"] == all(x["result"] == "beats" for t in v["tasks"].values() for x in t["vs"].values())
    # the verdict is the run's own comparison, and the shards are its teacher
    comp = json.loads((run / "probe_comparison.json").read_text())
    assert verdict(comp, 3) == v
    from chexfound.ssl.checkpoint import load_backbone_shards

    model, meta = load_backbone_shards(proof)
    assert meta["n_shards"] == len(shards) and model.cfg.img_size == 64


def test_verdict_needs_every_baseline_beaten_on_both_tasks():
    def task(lo_pixels):
        paired = {"teacher_minus_init": {"diff": 0.1, "ci95": [0.05, 0.15]},
                  "teacher_minus_random_seed0": {"diff": 0.1, "ci95": [0.05, 0.15]},
                  "teacher_minus_pixels": {"diff": lo_pixels + 0.02, "ci95": [lo_pixels, lo_pixels + 0.04]}}
        return {"auroc": {"teacher": {"auroc": 0.9}}, "paired": paired}

    assert verdict({"kermany": task(0.01), "nih14": task(0.01)}, 1)["passed"]
    v = verdict({"kermany": task(0.01), "nih14": task(-0.02)}, 1)
    assert not v["passed"] and v["tasks"]["nih14"]["vs"]["pixels"]["result"] == "ties"
    v = verdict({"kermany": task(0.01), "nih14": task(0.01)}, 3)  # two random inits were turned down
    assert not v["passed"] and "1 of 3 random inits" in v["notes"][0]
    assert not verdict({"kermany": task(0.01)}, 1)["passed"]


def test_gather_writes_strict_json_when_a_bound_is_nan(tmp_path):
    """A degenerate finding gives a NaN CI: verdict.json must still be JSON (null), not Python's NaN."""
    from chexfound.ssl.gpu_proof import gather

    run = tmp_path / "run"
    (run / "teacher_bf16").mkdir(parents=True)
    (run / "teacher_bf16" / "teacher_backbone.01-of-01.safetensors").write_bytes(b"x")
    (run / "pretrain.log").write_text("log\n")
    paired = {"teacher_minus_pixels": {"diff": float("nan"), "ci95": [float("nan"), float("nan")]}}
    v = verdict({"kermany": {"auroc": {"teacher": {"auroc": 0.5}}, "paired": paired}}, 0)
    files = gather(run, tmp_path / "proof", v)
    assert [f.name for f in files] == ["teacher_backbone.01-of-01.safetensors", "proof.tar.gz", "verdict.json"]

    def no_nan(c):
        raise ValueError(c)

    back = json.loads((tmp_path / "proof" / "verdict.json").read_text(), parse_constant=no_nan)
    assert back["tasks"]["kermany"]["vs"]["pixels"]["ci95"] == [None, None] and not back["passed"]
    assert sorted(p.name for p in (tmp_path / "proof").iterdir()) == sorted(f.name for f in files)  # no temp left
