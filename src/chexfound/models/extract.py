"""The backbone forward every feature consumer shares, and `extract_features` for images held in memory.

`forward_blocks` runs `get_intermediate_layers` for images held in memory: normalisation on the device
(`InputTransform.normalise`), compute dtype by autocast, eval mode, no autograd. `extract_features` (the
pretraining probes' decoded images, curation's near-duplicate embeddings) calls it; the file-driven engine
(`chexfound.models.embedder`) runs the same normalisation and `get_intermediate_layers` through its own
forward (`_forward_fn`: packed / compiled / CUDA-graph backbones from `chexfound.models.inference`), and a
test checks that both give the same features.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from chexfound.models.pooled import PooledFeatures, pool_tokens

BlockOutputs = tuple[tuple[Tensor, Tensor], ...]
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A compute dtype as the CLI spells it (fp32 | bf16 | fp16, or the torch names); None is float32."""
    from chexfound.errors import ConfigError

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {**COMPUTE_DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ConfigError(None, f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return table[dtype]


def autocast_for(device: torch.device, compute: str | torch.dtype) -> ContextManager[Any]:
    """Autocast context for a compute dtype name (fp32 | bf16 | fp16) or dtype; fp32 is a no-op."""
    dt = COMPUTE_DTYPES[compute] if isinstance(compute, str) else compute
    if dt == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dt)


def forward_blocks(model: nn.Module, x: Tensor, n_blocks: int, transform: Any = None,
                   amp: Callable[[], ContextManager[Any]] | None = None) -> BlockOutputs:
    """Patch and CLS tokens of the last `n_blocks` blocks for a batch already on the model's device.
    With `transform` (an InputTransform), `x` holds prepared images (uint8 or float, 1 or 3 channels)
    that are normalised here, on the device; without, `x` is the normalised input."""
    if transform is not None:
        x = transform.normalise(x)
    with amp() if amp is not None else nullcontext():
        return tuple(model.get_intermediate_layers(x, n=n_blocks, return_class_token=True))


@torch.no_grad()  # not inference_mode: the model may be a pretraining teacher between steps
def extract_features(model: nn.Module, images: Tensor, *, n_blocks: int = 1, transform: Any = None,
                     batch_size: int = 64, device: torch.device | str | None = None,
                     autocast: Callable[[], ContextManager[Any]] | str | None = None,
                     ids: Sequence[str] | None = None) -> PooledFeatures:
    """Pooled features (CLS of the last `n_blocks` blocks + mean patch token) of an in-memory image tensor.

    images: [N, 1 or 3, S, S] prepared images (uint8 0..255 or float 0..1) when `transform` is given (they
    are normalised on `device` batch by batch), else normalised model input. `autocast` is a context
    factory (as the pretraining trainer holds) or a compute dtype name (fp32 | bf16 | fp16)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if isinstance(autocast, str) or autocast is None:
        name = autocast or "fp32"
        amp: Callable[[], ContextManager[Any]] = lambda: autocast_for(dev, name)  # noqa: E731
    else:
        amp = autocast
    was_training = model.training
    model.eval()
    cls_parts, pm_parts = [], []
    try:
        for s in range(0, images.shape[0], batch_size):
            x = images[s : s + batch_size].to(dev, non_blocking=True)
            cls, pm = pool_tokens(forward_blocks(model, x, n_blocks, transform, amp))
            cls_parts.append(cls.cpu())
            pm_parts.append(pm.cpu())
    finally:
        model.train(was_training)
    if not cls_parts:
        raise ValueError("no images to extract features from")
    cls_all = torch.cat(cls_parts).numpy()
    return PooledFeatures(cls_all, torch.cat(pm_parts).numpy(), np.ones(len(cls_all), dtype=bool),
                          ids=list(ids) if ids is not None else [])
