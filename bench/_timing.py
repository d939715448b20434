"""The one timing toolkit of bench/: every bench measures with these, so their figures mean the same thing.

- `sync`: wait for the device (CUDA work is asynchronous; a timing without it measures the launch).
- `Stopwatch`: seconds of one block (`with Stopwatch() as sw: ...; sw.seconds`), on a chosen clock.
- `best_seconds`: the least disturbed seconds per call (the best of a few rounds after warm-up): on a shared
  machine, other jobs only ever add time, so the minimum is the estimate of the code's own cost.
- `rate`: calls per second of one function over a time budget.
- `interleaved_rates`: calls per second of several functions timed in alternating rounds, so that load from
  other processes hits them alike (a ratio between them is then fair).
- `matmul_peak`: this device's best GEMM FLOP rate in a dtype, the reference for every "% of peak".
- `smoke_mode`: what a bench's `--smoke` run needs: the tiny test backbones registered here and in the
  processes it starts (they are kept out of the production registry).

Clocks: `WALL` (time.perf_counter) or `CPU` (time.thread_time: the CPU time of the calling thread, which other
jobs on a shared machine do not inflate; meaningful for one-thread CPU work only).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping

Clock = Callable[[], float]
WALL: Clock = time.perf_counter
CPU: Clock = time.thread_time


def sync(dev: Any = None) -> None:
    """Wait for queued work on `dev` (a torch.device or name; CPU and None: nothing to wait for)."""
    if dev is None:
        return
    import torch

    dev = torch.device(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Stopwatch:
    """`with Stopwatch(dev) as sw: work()` -> `sw.seconds` (synchronised with `dev` at both ends)."""

    def __init__(self, dev: Any = None, clock: Clock = WALL) -> None:
        self.dev, self.clock, self.seconds = dev, clock, math.nan
        self._t0 = 0.0

    def __enter__(self) -> "Stopwatch":
        sync(self.dev)
        self._t0 = self.clock()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.dev)
        self.seconds = self.clock() - self._t0


def best_seconds(fn: Callable[[], object], iters: int = 3, warmup: int = 1, dev: Any = None,
                 clock: Clock = WALL, calls: int = 1) -> float:
    """Least disturbed seconds per call of `fn`: `warmup` untimed calls, then the best of `iters` rounds of
    `calls` calls each (several calls per round amortise the synchronisation of short kernels)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    best = math.inf
    for _ in range(max(1, iters)):
        t = clock()
        for _ in range(calls):
            fn()
        sync(dev)
        best = min(best, (clock() - t) / calls)
    return best


def rate(fn: Callable[[], object], seconds: float, min_calls: int = 1, clock: Clock = WALL,
         dev: Any = None) -> float:
    """Calls per second of `fn`, called for at least `seconds` (wall time) and `min_calls` times; the rate is
    on `clock` (e.g. CPU time for a one-thread decode)."""
    n, t_end, c0 = 0, time.perf_counter() + seconds, clock()
    while n < min_calls or time.perf_counter() < t_end:
        fn()
        n += 1
    sync(dev)
    return n / max(clock() - c0, 1e-12)


def interleaved_rates(fns: Mapping[str, Callable[[], int]], seconds: float, rounds: int = 3,
                      dev: Any = None) -> dict[str, float]:
    """Items per second of each function (each call returns how many items it did), timed in `rounds`
    alternating rounds that share `seconds`, after one warm-up call each."""
    for fn in fns.values():
        fn()
    sync(dev)
    count = {k: 0 for k in fns}
    spent = {k: 0.0 for k in fns}
    for _ in range(max(1, rounds)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            while count[k] == 0 or time.perf_counter() - t0 < seconds / rounds / len(fns):
                count[k] += fn()
            sync(dev)
            spent[k] += time.perf_counter() - t0
    return {k: count[k] / spent[k] for k in fns}


def matmul_peak(dtype: Any, dev: Any = "cpu", n: int = 2048, seconds: float = 2.0, packed: bool = False,
                clock: Clock = WALL) -> float:
    """Best FLOP/s of an n x n x n GEMM in `dtype` on `dev`. `packed` (CPU) also times oneDNN with a weight packed
    once, and keeps the faster: for fp32 MKL and oneDNN differ, and the faster is the practical peak."""
    import torch

    dev = torch.device(dev)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    fns: list[Callable[[], object]] = [lambda: a @ b]
    if packed and dev.type == "cpu":
        from chexfound.models.fast import packing_available

        if packing_available():
            w = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)
            bias = torch.zeros(n, dtype=dtype)
            fns.append(lambda: torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], ""))
    calls = 10 if dev.type == "cuda" else 1
    best = math.inf
    for fn in fns:
        fn()
        sync(dev)
        t_end = time.perf_counter() + seconds / len(fns)
        while True:
            best = min(best, best_seconds(fn, iters=1, warmup=0, dev=dev, clock=clock, calls=calls))
            if time.perf_counter() >= t_end:
                break
    return 2 * n**3 / best


def smoke_mode() -> None:
    """Register the tiny test backbones (`tiny_vit`, `tiny_vit_mlp`) in this process and, through
    CHEXFOUND_MODEL_MODULES, in every process it starts: a bench's `--smoke` run uses them to check its code
    paths in seconds, from a plain source tree (no test suite, no install)."""
    from chexfound.models.testing import enable

    enable()
