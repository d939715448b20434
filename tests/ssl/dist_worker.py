"""Run by test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU).

1. Sinkhorn-Knopp on each rank's half of a batch, all-reduced, equals the single-process result on the
   whole batch. 2. The `chexfound pretrain` CLI trains with DDP (the loop checks the ranks' teachers agree), then FSDP2.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from chexfound.cli.main import main
from chexfound.ssl import distributed as D
from chexfound.ssl.centering import sinkhorn_knopp

out, corpus, config = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
# Our own group: pretrain() joins it and leaves it up (it only tears down groups it created), so both
# CLI runs below share it.
dist.init_process_group("gloo")
info = D.init_distributed("cpu")
full = torch.rand(10, 7, generator=torch.Generator().manual_seed(3)) * 2 - 1
half = full[:6] if info.rank == 0 else full[6:]  # unequal halves (as masked patches per rank)
q = sinkhorn_knopp(half, 0.05, 3)
parts = [None, None]
dist.all_gather_object(parts, q.numpy().tolist())
if info.rank == 0:
    (out / "sk.json").write_text(json.dumps({"distributed": parts[0] + parts[1], "full": full.numpy().tolist()}))
dist.barrier()
for name, mode in (("run", "ddp"), ("run_fsdp", "fsdp")):
    rc = main(["pretrain", "--config", config, "--data", corpus, "--out", str(out / name), "--quiet",
               "--device", "cpu", f"train.distributed={mode}"])
    if rc:
        sys.exit(rc)
