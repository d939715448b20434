"""Recent predictions kept in memory so the page can fetch the image and each finding's heatmap by URL."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CachedPrediction:
    view: np.ndarray  # uint8 [S, S]: the model's view of the upload, at display size
    maps: np.ndarray | None  # attention maps [findings, h, w], None for heads without attention


class PredictionCache:
    """A small thread-safe LRU keyed by random ids (unguessable, so one client cannot list another's)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, CachedPrediction] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, view: np.ndarray, maps: np.ndarray | None) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._items[key] = CachedPrediction(view, maps)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> CachedPrediction | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def __len__(self) -> int:
        return len(self._items)
