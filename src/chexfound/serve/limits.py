"""What keeps one hostile upload, or many at once, from exhausting the service: an image-size limit checked
from the header before any pixel is decoded, and a gate on how many uploads are decoded and run at once.

Size: a chest radiograph is at most about 4300 x 4300 pixels (a 43 x 43 cm detector at 0.1 mm pitch), so
`DEFAULT_MAX_IMAGE_PIXELS` (25 M pixels, 5000 x 5000) refuses nothing real, while a 124 KB PNG that declares
8000 x 8000 16-bit pixels (~680 MB once decoded to floats) is refused from its IHDR. JPEG's SOF and DICOM's
Rows/Columns are read the same way (`chexfound.io.declared_size`); the decoded size is checked again,
because a header can understate.

Concurrency: every upload being decoded or waiting for the model holds a full-size image, so at most
`WorkGate.capacity` (default: the CPU cores this process may use) are in that stage at once. The others wait
up to `busy_wait_s` (10 s by default) for a slot, in the event loop, so no worker thread is blocked and
`/healthz` keeps answering; past the wait they get 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

# ~4300 x 4300 is the largest real CXR; 5000 x 5000 leaves room for a detector we have not met.
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def size_problem(sides: tuple[int, ...], max_side: int, max_pixels: int) -> str | None:
    """Why an image of `sides` (rows, cols) is refused, or None when it is within both limits."""
    rows, cols = int(sides[0]), int(sides[1])
    if max(rows, cols) > max_side:
        return f"image is {rows}x{cols} pixels; the limit is {max_side} per side"
    if rows * cols > max_pixels:
        return (f"image is {rows}x{cols} = {rows * cols:,} pixels; the limit is {max_pixels:,} pixels "
                f"(a chest X-ray is at most ~4300x4300)")
    return None


class GateBusy(Exception):
    """Every slot stayed taken for the whole wait: the caller answers 503."""


class WorkGate:
    """At most `capacity` holders at once; `enter` waits (without blocking a thread) up to `wait_s`.

    A plain counter under a lock, polled by the waiting coroutine: it works from any event loop and any
    thread (tests and uvicorn run different loops), unlike asyncio or anyio primitives bound to one loop."""

    def __init__(self, capacity: int, wait_s: float) -> None:
        if capacity < 1:
            raise ValueError(f"the decode gate needs at least one slot, got {capacity}")
        self.capacity, self.wait_s = int(capacity), float(wait_s)
        self._lock = threading.Lock()
        self._held = 0
        self.refused = 0

    @property
    def held(self) -> int:
        return self._held

    def try_enter(self) -> bool:
        with self._lock:
            if self._held >= self.capacity:
                return False
            self._held += 1
            return True

    def leave(self) -> None:
        with self._lock:
            if self._held <= 0:
                raise RuntimeError("WorkGate.leave() without a matching enter")
            self._held -= 1

    async def enter(self) -> None:
        """Take a slot, waiting up to `wait_s`; raises GateBusy (and counts it) when none frees up."""
        deadline = time.monotonic() + self.wait_s
        pause = 0.002
        while not self.try_enter():
            left = deadline - time.monotonic()
            if left <= 0:
                with self._lock:
                    self.refused += 1
                raise GateBusy(f"{self.capacity} uploads are being decoded or run and none finished within "
                               f"{self.wait_s:g} s")
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)

    def to_dict(self) -> dict[str, int]:
        return {"capacity": self.capacity, "held": self._held, "refused": self.refused}
