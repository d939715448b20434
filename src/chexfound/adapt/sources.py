"""Where head training reads features from: a FeatureCache on disk or tensors in memory (same API)."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from chexfound.adapt.heads.base import Features


@runtime_checkable
class FeatureSource(Protocol):
    """Rows of `get_intermediate_layers(..., return_class_token=True)` output, indexable by image."""

    @property
    def valid(self) -> np.ndarray: ...

    @property
    def has_flip(self) -> bool: ...

    def __len__(self) -> int: ...

    def features(self, indices: Sequence[int] | np.ndarray, flip: bool = False) -> Features: ...


class TensorFeatures:
    """In-memory features (e.g. computed live, or in tests): a tuple over blocks of (patch[N,P,D], cls[N,D])."""

    def __init__(self, features: Features, flipped: Features | None = None) -> None:
        self._f = tuple((p.detach(), c.detach()) for p, c in features)
        self._flip = None if flipped is None else tuple((p.detach(), c.detach()) for p, c in flipped)
        self._n = self._f[0][1].shape[0]

    @property
    def valid(self) -> np.ndarray:
        return np.ones(self._n, dtype=bool)

    @property
    def has_flip(self) -> bool:
        return self._flip is not None

    def __len__(self) -> int:
        return self._n

    def features(self, indices: Sequence[int] | np.ndarray, flip: bool = False) -> Features:
        src = self._flip if flip else self._f
        if src is None:
            raise ValueError("these features have no flipped copy")
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return tuple((p[idx].float(), c[idx].float()) for p, c in src)


def as_source(x: FeatureSource | Features) -> FeatureSource:
    if isinstance(x, FeatureSource) and hasattr(x, "features"):
        return x
    return TensorFeatures(x)  # type: ignore[arg-type]
