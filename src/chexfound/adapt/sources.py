"""Where head training reads features from, all behind one API (`FeatureSource`):

- a token cache folder (`FeatureCache`: patch + CLS tokens; every head, GLoRI included),
- a pooled-features file from `chexfound embed --out` (`PooledSource`: CLS tokens + mean patch token;
  linear and MLP heads, which use nothing else),
- tensors in memory (`TensorFeatures`), and any of these restricted to some rows (`RowSubset`), which is
  how `chexfound adapt --features` maps its manifests onto one embedded collection.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from chexfound.adapt.heads.base import Features
from chexfound.errors import ConfigError
from chexfound.models.pooled import PooledFeatures


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


class PooledSource:
    """Pooled features as a source: block b gives (the mean patch token as a one-token "patch" [B, 1, D],
    CLS of block b [B, D]). Linear and MLP heads see exactly their usual input (CLS tokens + mean patch
    token); heads that attend over patches (GLoRI) need a token cache."""

    has_tokens = False

    def __init__(self, pooled: PooledFeatures) -> None:
        self.pooled = pooled
        self.meta = pooled.meta

    @property
    def valid(self) -> np.ndarray:
        return self.pooled.ok

    @property
    def has_flip(self) -> bool:
        return False

    @property
    def n_blocks(self) -> int:
        return self.pooled.n_blocks

    @property
    def paths(self) -> list[str]:
        return self.pooled.paths

    @property
    def ids(self) -> list[str]:
        return self.pooled.ids

    def __len__(self) -> int:
        return len(self.pooled)

    def features(self, indices: Sequence[int] | np.ndarray, flip: bool = False) -> Features:
        if flip:
            raise ValueError("pooled features have no flipped copy (embed with --tokens DIR --flip-tta)")
        idx = np.asarray(indices, dtype=np.int64)
        cls = torch.from_numpy(np.ascontiguousarray(self.pooled.cls[idx], dtype=np.float32))
        pm = torch.from_numpy(np.ascontiguousarray(self.pooled.patch_mean[idx], dtype=np.float32))[:, None]
        return tuple((pm, cls[:, b]) for b in range(cls.shape[1]))


class RowSubset:
    """Rows `rows` of another source, in that order; a row of -1 is an image the source does not hold
    (treated as unreadable: never trained on, NaN predictions)."""

    def __init__(self, source: Any, rows: Sequence[int] | np.ndarray) -> None:
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)
        self.has_tokens = getattr(source, "has_tokens", True)

    @property
    def valid(self) -> np.ndarray:
        ok = self.rows >= 0
        out = np.zeros(len(self.rows), dtype=bool)
        out[ok] = np.asarray(self.source.valid)[self.rows[ok]]
        return out

    @property
    def has_flip(self) -> bool:
        return bool(self.source.has_flip)

    def __len__(self) -> int:
        return len(self.rows)

    def __getattr__(self, name: str) -> Any:  # n_blocks, grid, meta, backbone_sha256 of the whole source
        if name in ("paths", "ids"):
            whole = getattr(self.source, name)
            return [whole[r] if r >= 0 else "" for r in self.rows]
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    @property
    def errors(self) -> list[tuple[int, str, str]]:
        pos = {int(r): k for k, r in enumerate(self.rows) if r >= 0}
        return [(pos[r], p, e) for r, p, e in getattr(self.source, "errors", []) if r in pos]

    def features(self, indices: Sequence[int] | np.ndarray, flip: bool = False) -> Features:
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        if (rows < 0).any():
            raise ValueError("asked for features of an image the source does not hold")
        return self.source.features(rows, flip=flip)


def open_features(path: str | PathLike[str]) -> Any:
    """What `chexfound embed` wrote: a token cache folder (FeatureCache) or a pooled file (PooledSource)."""
    p = Path(path)
    if p.is_dir():
        from chexfound.adapt.token_cache import FeatureCache

        return FeatureCache.open(p)
    if not p.is_file():
        raise ConfigError(p, "no such features file or token cache folder")
    from chexfound.models.pooled_file import read_pooled

    return PooledSource(read_pooled(p))


def match_rows(source: Any, paths: Sequence[str], ids: Sequence[str] | None = None) -> np.ndarray:
    """Row of each image in `source` (-1 where it holds none), by resolved path, else by image id."""
    by_path = {str(Path(p).resolve()): i for i, p in enumerate(source.paths) if p}
    by_id = {str(v): i for i, v in enumerate(source.ids) if v} if ids is not None else {}
    rows = np.full(len(paths), -1, dtype=np.int64)
    for k, p in enumerate(paths):
        r = by_path.get(str(Path(p).resolve()))
        if r is None and ids is not None:
            r = by_id.get(str(ids[k]))
        if r is not None:
            rows[k] = r
    return rows


def as_source(x: FeatureSource | Features) -> FeatureSource:
    if isinstance(x, FeatureSource) and hasattr(x, "features"):
        return x
    return TensorFeatures(x)  # type: ignore[arg-type]
