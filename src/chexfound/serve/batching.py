"""Micro-batching with a bounded number of requests in flight.

Concurrent requests each submit one preprocessed image; one worker thread gathers whatever is waiting
(up to `max_batch`, waiting at most `max_wait_ms` after the first arrival) and runs the model once for
all of them, so clients share the forward pass. Admission is bounded: a request first reserves a slot
(before its upload is decoded), and when all `capacity` slots are taken the caller gets `QueueFull`
(HTTP 503) instead of memory growing without limit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

BatchFn = Callable[[Tensor], tuple[np.ndarray, np.ndarray | None]]
Result = tuple[np.ndarray, np.ndarray | None]


class QueueFull(Exception):
    """All slots are taken: the caller should retry later (HTTP 503)."""


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    max_batch_seen: int = 0
    rejected: int = 0
    errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items, "max_batch_seen": self.max_batch_seen,
                "rejected": self.rejected, "errors": self.errors,
                "mean_batch": (self.items / self.batches) if self.batches else 0.0}


class Slot:
    """One admitted request. Release it (or use it as a context manager) when the request is done."""

    def __init__(self, batcher: "MicroBatcher") -> None:
        self._batcher = batcher
        self._released = False
        self._submitted = False

    def submit(self, x: Tensor) -> "Future[Result]":
        """Queue one image [3, S, S]; the future resolves to (probs [C], maps [C, g, g] or None)."""
        if self._released or self._submitted:
            raise RuntimeError("a slot carries exactly one image")
        self._submitted = True
        fut: Future[Result] = Future()
        self._batcher._queue.put((x, fut))  # never blocks: the queue holds at most `capacity` items
        return fut

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._batcher._release()

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class MicroBatcher:
    def __init__(self, fn: BatchFn, max_batch: int = 16, max_wait_ms: float = 5.0, capacity: int = 64) -> None:
        if max_batch < 1 or capacity < 1:
            raise ValueError("max_batch and capacity must be >= 1")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.capacity = capacity
        self.stats = BatcherStats()
        self._queue: queue.Queue[tuple[Tensor, Future[Result]] | None] = queue.Queue(maxsize=capacity + 1)
        self._lock = threading.Lock()
        self._admitted = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- admission --
    @property
    def in_flight(self) -> int:
        return self._admitted

    def reserve(self) -> Slot:
        with self._lock:
            if self._stopping:
                raise QueueFull("server is shutting down")
            if self._admitted >= self.capacity:
                self.stats.rejected += 1
                raise QueueFull(f"{self._admitted} requests in flight (limit {self.capacity})")
            self._admitted += 1
        return Slot(self)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    # -- worker --
    def start(self) -> "MicroBatcher":
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="chexfound-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        self._thread = None
        # Anything still queued will never run: fail it rather than leave its client waiting forever.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(QueueFull("server is shutting down"))

    def _gather(self, first: tuple[Tensor, Future[Result]]) -> tuple[list[tuple[Tensor, Future[Result]]], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._gather(first)
            # Clients that gave up (cancelled futures) do not cost a forward pass.
            live = [(x, f) for x, f in batch if f.set_running_or_notify_cancel()]
            if live:
                self._forward(live)
            if stop:
                return

    def _forward(self, live: list[tuple[Tensor, Future[Result]]]) -> None:
        try:
            probs, maps = self.fn(torch.stack([x for x, _ in live]))
        except Exception as e:  # the model failed: every waiting request learns why
            log.exception("batch of %d failed", len(live))
            self.stats.errors += 1
            for _, f in live:
                f.set_exception(e)
            return
        self.stats.batches += 1
        self.stats.items += len(live)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(live))
        for j, (_, f) in enumerate(live):
            f.set_result((probs[j], None if maps is None else maps[j]))
