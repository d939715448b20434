"""Run a trained head on features: a FeatureCache (or any FeatureSource) or one features tuple."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from chexfound.adapt.heads.base import Features, Head
from chexfound.adapt.sources import FeatureSource
from chexfound.runio import resolve_device


def _is_source(x: object) -> bool:
    return isinstance(x, FeatureSource) and hasattr(x, "features") and hasattr(x, "valid")


@torch.no_grad()
def predict(
    head: Head,
    features_or_cache: FeatureSource | Features,
    *,
    return_attention: bool = False,
    flip_tta: bool = False,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """Probabilities [N, C] (sigmoid for multilabel/binary, softmax for multiclass, values for regression,
    risk scores for survival) as a float32 CPU tensor; with `return_attention`, also the attention
    [N, heads, C, P] (None for heads without attention).

    For a cache, rows follow the cache (or `indices`); rows whose image could not be read are NaN.
    `flip_tta` averages the outputs of the image and its horizontal flip (cache built with flip_tta=True);
    attention is always that of the unflipped image."""
    dev = resolve_device(device)
    head = head.to(dev).eval()
    if not _is_source(features_or_cache):
        if flip_tta:
            raise ValueError("flip_tta needs a cache with flipped features; for live features average yourself")
        feats = tuple((p.to(dev).float(), c.to(dev).float()) for p, c in features_or_cache)  # type: ignore[union-attr]
        logits, attn = head(feats)
        probs = head.probabilities(logits).float().cpu()
        return (probs, None if attn is None else attn.float().cpu()) if return_attention else probs

    src: FeatureSource = features_or_cache  # type: ignore[assignment]
    if flip_tta and not src.has_flip:
        raise ValueError("flip_tta needs a cache built with flip_tta=True")
    idx = np.arange(len(src)) if indices is None else np.asarray(indices, dtype=np.int64)
    out = torch.full((len(idx), head.out_dim), float("nan"))
    attn_all: Tensor | None = None
    ok = np.flatnonzero(src.valid[idx])
    for s in range(0, len(ok), batch_size):
        pos = ok[s : s + batch_size]
        rows = idx[pos]
        logits, attn = head(tuple((p.to(dev), c.to(dev)) for p, c in src.features(rows)))
        probs = head.probabilities(logits)
        if flip_tta:
            flogits, _ = head(tuple((p.to(dev), c.to(dev)) for p, c in src.features(rows, flip=True)))
            probs = (probs + head.probabilities(flogits)) / 2
        out[torch.as_tensor(pos)] = probs.float().cpu()
        if return_attention and attn is not None:
            if attn_all is None:
                attn_all = torch.full((len(idx), *attn.shape[1:]), float("nan"))
            attn_all[torch.as_tensor(pos)] = attn.float().cpu()
    return (out, attn_all) if return_attention else out
