"""MicroBatcher: concurrent submissions share forward passes, results go back to the right caller,
admission is bounded."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from chexfound.serve.batching import MicroBatcher, QueueFull


class GatedModel:
    """Returns per-image sums (so each caller can check it got its own row); blocks until `gate` opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.batch_sizes: list[int] = []

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, None]:
        self.gate.wait(10)
        self.batch_sizes.append(x.shape[0])
        return x.flatten(1).sum(1, keepdim=True).numpy(), None


def test_concurrent_requests_are_batched_and_routed() -> None:
    model = GatedModel()
    b = MicroBatcher(model, max_batch=4, max_wait_ms=50, capacity=16).start()
    try:
        slots = [b.reserve() for _ in range(10)]
        futs = [s.submit(torch.full((1, 2, 2), float(i))) for i, s in enumerate(slots)]
        model.gate.set()
        results = [f.result(timeout=10) for f in futs]
    finally:
        for s in slots:
            s.release()
        b.stop()
    for i, (probs, maps) in enumerate(results):
        assert probs.tolist() == [4.0 * i] and maps is None
    assert sum(model.batch_sizes) == 10
    assert max(model.batch_sizes) == 4 and len(model.batch_sizes) < 10
    assert b.stats.items == 10 and b.stats.max_batch_seen == 4 and b.in_flight == 0


def test_capacity_bounds_admission() -> None:
    b = MicroBatcher(GatedModel(), max_batch=2, capacity=3)
    slots = [b.reserve() for _ in range(3)]
    with pytest.raises(QueueFull):
        b.reserve()
    assert b.stats.rejected == 1
    slots[0].release()
    slots[0].release()  # idempotent: a slot frees exactly one place
    extra = b.reserve()
    with pytest.raises(QueueFull):
        b.reserve()
    for s in [*slots[1:], extra]:
        s.release()
    assert b.in_flight == 0


def test_one_image_per_slot() -> None:
    b = MicroBatcher(GatedModel(), capacity=2)
    with b.reserve() as s:
        s.submit(torch.zeros(1))
        with pytest.raises(RuntimeError):
            s.submit(torch.zeros(1))
    assert b.in_flight == 0


def test_model_errors_reach_every_caller_and_cancelled_requests_are_dropped() -> None:
    calls: list[int] = []

    def broken(x: torch.Tensor) -> tuple[np.ndarray, None]:
        calls.append(x.shape[0])
        raise RuntimeError("out of memory")

    b = MicroBatcher(broken, max_batch=8, max_wait_ms=30, capacity=8)
    slots = [b.reserve() for _ in range(3)]
    futs = [s.submit(torch.zeros(2)) for s in slots]
    futs[1].cancel()  # that client went away before the batch ran
    b.start()
    try:
        for i in (0, 2):
            with pytest.raises(RuntimeError, match="out of memory"):
                futs[i].result(timeout=10)
    finally:
        b.stop()
    assert calls == [2] and b.stats.errors == 1


def test_stop_fails_queued_requests() -> None:
    b = MicroBatcher(GatedModel(), capacity=4)  # never started: nothing will run what is queued
    with b.reserve() as s:
        fut = s.submit(torch.zeros(1))
    b.stop()
    with pytest.raises(QueueFull):
        fut.result(timeout=5)
    with pytest.raises(QueueFull):
        b.reserve()


def test_many_threads_no_lost_results() -> None:
    b = MicroBatcher(lambda x: (x.sum(dim=1, keepdim=True).numpy(), None), max_batch=8, max_wait_ms=2,
                     capacity=64).start()

    def one(i: int) -> float:
        with b.reserve() as s:
            return float(s.submit(torch.tensor([float(i), 1.0])).result(timeout=10)[0][0])

    try:
        with ThreadPoolExecutor(16) as ex:
            got = list(ex.map(one, range(200)))
    finally:
        b.stop()
    assert got == [i + 1.0 for i in range(200)]
    assert b.stats.items == 200
