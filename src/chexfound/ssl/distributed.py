"""torch.distributed for pretraining: a launch mode, not a code path.

`torchrun` sets RANK/WORLD_SIZE/LOCAL_RANK; without them everything runs in one process and the collective
helpers below are no-ops. Backend: NCCL when training on CUDA, gloo otherwise.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_OWNED = False  # whether init_distributed created the process group (then destroy() may tear it down)


def init_distributed(device: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Initialise the process group from torchrun's environment (if any) and pick this rank's device."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        global _OWNED
        _OWNED = True
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """In place, returns t."""
    if is_enabled():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    if is_enabled():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    if is_enabled():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def destroy() -> None:
    """Tear down the process group if we created it (a caller's own group is left alone)."""
    global _OWNED
    if _OWNED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _OWNED = False
