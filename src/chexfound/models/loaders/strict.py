"""Build a VisionTransformer from a config and load backbone tensors strictly.

Every expected key must be present and nothing else may be left over; the only shape difference
tolerated is the position-embedding grid, which is resized (with a warning) by the model's own
interpolation rule, so the result equals what the original computes on the fly at that size.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from chexfound.errors import CheckpointError
from chexfound.models.config import ViTConfig
from chexfound.models.loaders.keys import summarise_keys
from chexfound.models.vit import VisionTransformer, resize_pos_embed

log = logging.getLogger(__name__)


def describe_config(cfg: ViTConfig) -> str:
    return (f"ViT (patch {cfg.patch_size}, dim {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, "
            f"{cfg.num_register_tokens} registers, {cfg.ffn_layer} FFN, {cfg.img_size} px)")


def _pos_grid_differs_only(v: Tensor, want: torch.Size) -> bool:
    if v.ndim != 3 or v.shape[0] != 1 or v.shape[2] != want[2]:
        return False
    n = v.shape[1] - 1
    return n > 0 and math.isqrt(n) ** 2 == n


def load_backbone_strict(
    cfg: ViTConfig, sd: dict[str, Tensor], path: str | Path, optional: tuple[str, ...] = (),
    file_key: Callable[[str], str] | None = None,
) -> tuple[VisionTransformer, list[str]]:
    """-> (model in eval mode, warnings). `optional` keys may be absent and keep their init (zeros), e.g. the
    mask token of a Hugging Face model saved with use_mask_token=False. `file_key` spells our tensor names as
    the file does, so errors name the tensors the user can find in it."""
    named = file_key or (lambda k: k)
    try:
        # Build on the meta device: skips the random init of ~300M parameters we overwrite anyway.
        with torch.device("meta"):
            model = VisionTransformer(cfg)
    except ValueError as e:
        raise CheckpointError(path, f"cannot build the model: {e}") from e
    expected = {k: v for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd) - set(optional))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {summarise_keys(map(named, missing))}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {summarise_keys(map(named, unexpected))}")
        raise CheckpointError(path, f"backbone keys do not match a {describe_config(cfg)}; " + "; ".join(parts))
    out_warnings: list[str] = []
    sd = dict(sd)
    bad = []
    for k, v in sd.items():
        want = expected[k].shape
        if v.shape == want:
            continue
        if k == "pos_embed" and _pos_grid_differs_only(v, want):
            m = math.isqrt(v.shape[1] - 1)
            g = cfg.grid_size
            msg = (f"{path}: position embedding grid {m}x{m} resized to {g}x{g} for {cfg.img_size} px inputs "
                   f"(bicubic, offset {cfg.interpolate_offset}, antialias {cfg.interpolate_antialias})")
            warnings.warn(msg, UserWarning, stacklevel=3)
            log.warning(msg)
            out_warnings.append(msg)
            sd[k] = resize_pos_embed(v, (g, g), cfg.interpolate_offset, cfg.interpolate_antialias)
        else:
            bad.append(f"{named(k)}: file {tuple(v.shape)} vs model {tuple(want)}")
    if bad:
        raise CheckpointError(path, f"tensor shapes do not match a {describe_config(cfg)}: " + "; ".join(bad[:12])
                              + (f" ... ({len(bad) - 12} more)" if len(bad) > 12 else ""))
    non_float = [k for k, v in sd.items() if not torch.is_floating_point(v)]
    if non_float:
        raise CheckpointError(path, f"non-floating-point backbone tensors: {summarise_keys(non_float)}")
    model.to_empty(device="cpu")
    for k in optional:
        if k not in sd:
            sd[k] = torch.zeros(expected[k].shape)
    # fp16/bf16 files are upcast to the model's fp32 here (copy_ casts).
    model.load_state_dict(sd, strict=True)
    return model.eval(), out_warnings
