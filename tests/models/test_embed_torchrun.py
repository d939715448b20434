"""`torchrun --nproc_per_node=2 -m chexfound embed` on CPU/gloo writes one pooled file and one token cache,
and a run killed part-way resumes: the rerun computes only the chunks no rank had finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chexfound.adapt.token_cache import FeatureCache
from chexfound.cli.main import main
from chexfound.models.pooled_file import read_features

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_ranks_one_output_resumable_after_a_kill(data_root: Path, tmp_path: Path) -> None:
    images = [str(p) for p in sorted((data_root / "nih14" / "images").glob("*.png"))[:48]]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    images.insert(5, str(bad))
    n_chunks = len(images)  # --chunk-size 1
    single = tmp_path / "single"
    assert main(["embed", *images, "--config", "tiny_vit", "--out", str(single / "f.npz"), "--tokens",
                 str(single / "tok"), "--chunk-size", "1", "--quiet"]) == 0

    out, tok = tmp_path / "multi" / "f.npz", tmp_path / "multi" / "tok"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "chexfound", "embed", *images, "--config", "tiny_vit", "--out", str(out), "--tokens", str(tok),
           "--chunk-size", "1", "--batch-size", "1", "--quiet"]
    parts = out.with_name(out.name + ".parts")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(parts.glob("chunk*.safetensors"))) < 4:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else "exited"
            assert time.monotonic() < deadline, "no chunks appeared"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
        proc.wait()
    assert not out.exists(), "the run finished before it could be killed: use more images"
    done_at_kill = len(list(parts.glob("chunk*.safetensors")))
    assert 4 <= done_at_kill < n_chunks
    assert list(tok.glob("status.rank*.npy"))  # each rank kept its own progress

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Every chunk was committed exactly once over the two runs: nothing finished was recomputed.
    records = [json.loads(line) for line in out.with_name("f.metrics.jsonl").read_text().splitlines()]
    assert sorted(r["chunk"] for r in records) == list(range(n_chunks))
    a, b = read_features(out), read_features(single / "f.npz")
    np.testing.assert_allclose(a["cls"], b["cls"], atol=1e-6)
    assert a["path"] == b["path"] and [s[1] for s in a["meta"]["skipped"]] == [str(bad)]
    ca, cb = FeatureCache.open(tok), FeatureCache.open(single / "tok")
    assert not list(tok.glob("status.rank*.npy")) and ca.valid.tolist() == cb.valid.tolist()
    rows = np.flatnonzero(cb.valid)
    for (pa, xa), (pb, xb) in zip(ca.features(rows), cb.features(rows)):
        np.testing.assert_allclose(pa.numpy(), pb.numpy(), atol=1e-3)
        np.testing.assert_allclose(xa.numpy(), xb.numpy(), atol=1e-3)
    np.testing.assert_allclose(ca.pooled().cls, cb.pooled().cls, atol=1e-6)
