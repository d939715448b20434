"""Pooled image features and the one linear-probe input built from them.

A backbone's `get_intermediate_layers(x, n, return_class_token=True)` output (per block: patch tokens
[B, P, D] and CLS [B, D]) is pooled to two arrays per image, the same everywhere in the project (the
`chexfound embed` file, the token cache's pooled view, the pretraining probes, the evaluate protocols):

    cls         [N, n_blocks, D]  the normed CLS token of each of the last n blocks (ascending block order)
    patch_mean  [N, D]            the mean of the last block's normed patch tokens

`linear_input` is DINOv2's `create_linear_input`: the CLS tokens of the last `n_blocks` blocks
concatenated, plus the mean patch token when `avgpool`. It works on numpy arrays and on torch tensors, so
the linear/MLP heads, the logistic probes and the features files all build the same vector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)


def pool_tokens(outputs: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """`get_intermediate_layers(..., return_class_token=True)` output -> (cls [B, n, D], patch_mean [B, D]),
    computed in float32 whatever the compute dtype was."""
    cls = torch.stack([c.float() for _, c in outputs], dim=1)
    patch_mean = outputs[-1][0].float().mean(dim=1)
    return cls, patch_mean


def linear_input(cls: ArrayT, patch_mean: ArrayT | None, n_blocks: int = 1, avgpool: bool = False) -> ArrayT:
    """[N, n*D (+D)]: CLS of the last `n_blocks` blocks concatenated (+ the mean patch token)."""
    if cls.ndim != 3:
        raise ValueError(f"cls must be [N, blocks, D], got shape {tuple(cls.shape)}")
    if not 1 <= n_blocks <= cls.shape[1]:
        raise ValueError(f"features hold the CLS of {cls.shape[1]} block(s), asked for {n_blocks}")
    x = cls[:, -n_blocks:].reshape(cls.shape[0], -1)
    if not avgpool:
        return x
    if patch_mean is None:
        raise ValueError("avgpool needs the mean patch token")
    if isinstance(x, Tensor):
        return torch.cat([x, patch_mean.to(x.dtype)], dim=1)
    return np.concatenate([x, patch_mean.astype(x.dtype, copy=False)], axis=1)


def linear_input_from_blocks(features: Sequence[tuple[Tensor, Tensor]], n_blocks: int, avgpool: bool) -> Tensor:
    """The same vector straight from block outputs (what a linear head sees during training on tokens)."""
    feats = list(features)[-n_blocks:]
    cls = torch.stack([c for _, c in feats], dim=1)
    return linear_input(cls, feats[-1][0].mean(dim=1) if avgpool else None, n_blocks, avgpool)


@dataclass
class PooledFeatures:
    """Pooled features of N images. Rows whose image could not be read hold zeros and `ok` False."""

    cls: np.ndarray                   # [N, n_blocks, D] float32
    patch_mean: np.ndarray            # [N, D] float32
    ok: np.ndarray                    # [N] bool
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (row, path, reason)
    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.cls.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.cls.shape[1])

    @property
    def embed_dim(self) -> int:
        return int(self.cls.shape[2])

    def vectors(self, n_blocks: int | None = None, avgpool: bool = False) -> np.ndarray:
        """The linear-probe input of every row (float32)."""
        return linear_input(self.cls, self.patch_mean, n_blocks or self.n_blocks, avgpool).astype(np.float32,
                                                                                                   copy=False)

    def subset(self, rows: Sequence[int] | np.ndarray) -> "PooledFeatures":
        """These rows, in this order (errors renumbered to the new rows)."""
        idx = np.asarray(rows, dtype=np.int64)
        pos = {int(r): k for k, r in enumerate(idx)}
        errs = [(pos[r], p, e) for r, p, e in self.errors if r in pos]
        ids = [self.ids[i] for i in idx] if self.ids else []
        paths = [self.paths[i] for i in idx] if self.paths else []
        return PooledFeatures(self.cls[idx], self.patch_mean[idx], self.ok[idx], errs, ids, paths, dict(self.meta))
