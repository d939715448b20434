"""torch.distributed for pretraining: the names the ssl loop uses, kept here; they live in chexfound.runio
(one device rule and one process-group setup for every command)."""

from chexfound.runio.device import resolve_device
from chexfound.runio.distributed import (DistInfo, all_reduce_max, all_reduce_mean, all_reduce_sum, barrier,
                                         broadcast_object, destroy, init_distributed, is_enabled, rank, world_size)

__all__ = ["DistInfo", "all_reduce_max", "all_reduce_mean", "all_reduce_sum", "barrier", "broadcast_object",
           "destroy", "init_distributed", "is_enabled", "rank", "world_size", "resolve_device"]
