"""Pooled image features for the logistic probe, read from the adapt stage's feature cache.

Every protocol computes features once per (backbone, image list) into a `chexfound.adapt.FeatureCache`
(the backbone's `get_intermediate_layers` output: patch and CLS tokens of the last n blocks) under the run
folder; a rerun with the same --out reuses it. The adapt heads read the cache directly; the logistic probe
needs only pooled vectors, gathered here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class FeatureSet:
    cls: np.ndarray          # [N, n_blocks, D] float32 (zeros for unreadable images)
    patch_mean: np.ndarray   # [N, D] mean of last-block patch tokens
    ok: np.ndarray           # [N] bool: image was read
    errors: list[tuple[int, str, str]] = field(default_factory=list)

    def vectors(self, n_blocks: int | None = None, avgpool: bool = False) -> np.ndarray:
        """[N, n*D (+D)]: the linear-probe input (CLS of the last n blocks, optionally + mean patch)."""
        c = self.cls if n_blocks is None else self.cls[:, -n_blocks:]
        x = c.reshape(c.shape[0], -1)
        return np.concatenate([x, self.patch_mean], axis=1) if avgpool else x


def pooled_features(cache: Any, chunk: int = 256) -> FeatureSet:
    """CLS tokens of every cached block and the mean patch token of the last, for all rows of a cache."""
    n = len(cache)
    valid = np.asarray(cache.valid, dtype=bool)
    cls: np.ndarray | None = None
    pm: np.ndarray | None = None
    for s in range(0, n, chunk):
        idx = np.arange(s, min(n, s + chunk))
        feats = cache.features(idx)
        c = torch.stack([cl for _, cl in feats], dim=1).numpy()
        p = feats[-1][0].mean(dim=1).numpy()
        if cls is None:
            cls = np.zeros((n, *c.shape[1:]), dtype=np.float32)
            pm = np.zeros((n, p.shape[1]), dtype=np.float32)
        cls[idx], pm[idx] = c, p
    if cls is None or pm is None:
        raise ValueError("empty feature cache")
    cls[~valid] = 0
    pm[~valid] = 0
    errors = [(int(i), str(p), str(e)) for i, p, e in cache.errors]
    return FeatureSet(cls, pm, valid, errors)
