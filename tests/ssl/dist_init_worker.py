"""Run by test_init_from.py under `torchrun --nproc_per_node=2` (gloo, CPU): `pretrain --init-from` under DDP
and under FSDP2, at learning rate 0 (so the exported teacher must be the source itself)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from chexfound.cli.main import main
from chexfound.ssl import distributed as D

out, corpus, config, source = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo")  # our group, shared by both runs (pretrain leaves groups it did not create)
D.init_distributed("cpu")
for mode in ("ddp", "fsdp"):
    rc = main(["pretrain", "--config", config, "--data", corpus, "--out", str(out / mode), "--quiet", "--device",
               "cpu", "--init-from", source, f"train.distributed={mode}", "optim.base_lr=0.0"])
    if rc:
        sys.exit(rc)
