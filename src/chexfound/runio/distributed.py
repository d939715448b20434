"""torch.distributed as a launch mode, not a code path.

`torchrun` sets RANK/WORLD_SIZE/LOCAL_RANK; without them everything runs in one process and the collective
helpers below are no-ops, so the same command runs alone or on many GPUs. Backend: NCCL on CUDA, gloo
otherwise. torch is imported lazily, as everywhere in runio.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chexfound.runio.device import resolve_device

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["DistInfo", "all_reduce_max", "all_reduce_mean", "all_reduce_sum", "barrier", "broadcast_object",
           "destroy", "init_distributed", "is_enabled", "rank", "world_size"]


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=_cpu)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes reports, logs and progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process runs (collectives do something)."""
        return self.world_size > 1


_OWNED = False  # whether init_distributed created the process group (then destroy() may tear it down)


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 1800) -> DistInfo:
    """Pick this rank's device and, under torchrun, join the process group (unless the caller already did).
    "cuda" without an index means the local rank's GPU. `timeout_s`: how long a collective may wait (long
    for jobs whose ranks finish at very different times)."""
    import torch
    import torch.distributed as dist

    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank_ = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = resolve_device(torch.device("cuda", local if dev.index is None else dev.index))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        global _OWNED
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
        _OWNED = True
    return DistInfo(rank=rank_, world_size=world, local_rank=local, device=dev)


def is_enabled() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_enabled() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_enabled() else 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """In place, returns t."""
    if is_enabled():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    if is_enabled():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    if is_enabled():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_enabled():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_enabled():
        import torch.distributed as dist

        dist.barrier()


def destroy() -> None:
    """Tear down the process group if init_distributed created it (a caller's own group is left alone)."""
    global _OWNED
    import torch.distributed as dist

    if _OWNED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False
