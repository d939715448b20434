"""Where does a step's time go? Named sections, synchronised with the device when enabled; which operators of
a step would make the host wait for the device (`SyncCounter`); and the seconds per item of a batched call
(`seconds_per_item`, how the probes' feature cost is measured)."""

from __future__ import annotations

import contextlib
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that make the host wait for the device: reading a value (item/bool/float/int all lower to
# _local_scalar_dense) or producing a shape that depends on the data.
SYNCING_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2",
                         "unique_consecutive", "unique_dim", "repeat_interleave", "equal"})


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a clock read after it measures that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_item(run: Callable[[int], object], n_max: int, clock: Callable[[], float], device: torch.device,
                     start: int = 4, min_s: float = 0.5) -> float:
    """Seconds per item of `run(n)` (n items in one call): an untimed warm-up call (allocator, kernel
    selection), then timed calls of doubling n, until one takes `min_s` or n reaches `n_max`."""
    n = min(start, n_max)
    run(n)
    while True:
        synchronize(device)
        t0 = clock()
        run(n)
        synchronize(device)
        dt = clock() - t0
        if dt >= min_s or n >= n_max:
            return dt / n
        n = min(2 * n, n_max)


class SyncCounter(TorchDispatchMode):
    """Counts the operators run inside it that would wait for the device on a GPU, on any device (so a CPU
    test can prove a step sync-free). Host-to-device copies of pageable memory are not counted (on a GPU,
    `torch.cuda.set_sync_debug_mode` shows those)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name.split("::")[-1]
        if name in SYNCING_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class StepTimer:
    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device, self.enabled = device, enabled
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.totals[name] += time.perf_counter() - t0
            self.counts[name] += 1

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()

    def summary(self) -> dict[str, float]:
        """Mean seconds per call of each section."""
        return {k: self.totals[k] / max(1, self.counts[k]) for k in self.totals}
