"""Two processes on CPU with gloo, launched by torchrun: distributed Sinkhorn-Knopp, DDP and FSDP2 pretraining."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from chexfound.ssl.centering import sinkhorn_knopp

HERE = Path(__file__).parent


def test_two_ranks_agree(tmp_path, tiny_corpus, tiny_config):
    import torch

    cfg = tiny_config("train.batch_size_per_gpu=4", "optim.epochs=1", "train.epoch_length=3")
    cfg.pop("_preset")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_worker.py"), str(tmp_path), str(tiny_corpus), str(tmp_path / "tiny.yaml")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    sk = json.loads((tmp_path / "sk.json").read_text())
    ref = sinkhorn_knopp(torch.tensor(sk["full"]), 0.05, 3).numpy()  # one process, whole batch
    np.testing.assert_allclose(np.array(sk["distributed"]), ref, rtol=1e-5, atol=1e-7)

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ranks = [r for r in rows if r["kind"] == "ranks"]
    assert ranks and ranks[0]["agree"] and len(ranks[0]["teacher_sha256"]) == 2
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["global_batch"] == 8
    # FSDP2 (fully_shard per block) trains the same model as DDP, up to reduction order.
    from chexfound.models import create_backbone

    ddp = create_backbone(tmp_path / "run" / "teacher_backbone.safetensors")
    fsdp = create_backbone(tmp_path / "run_fsdp" / "teacher_backbone.safetensors")
    for (k, a), b in zip(ddp.state_dict().items(), fsdp.state_dict().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-5, err_msg=k)
