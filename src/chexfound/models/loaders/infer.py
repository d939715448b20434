"""Infer a ViT architecture from its tensors, and match it to a named config for the settings tensors do
not carry (position-embedding interpolation rule, input normalisation)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Literal

from torch import Tensor

from chexfound.errors import CheckpointError
from chexfound.models.config import ViTConfig
from chexfound.models.registry import get_config, list_configs
from chexfound.models.vit import swiglu_hidden

_STRUCTURAL = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "num_register_tokens", "ffn_layer",
               "qkv_bias", "proj_bias", "ffn_bias")


def _ffn_hidden(cfg: ViTConfig) -> int:
    return swiglu_hidden(cfg.embed_dim, cfg.mlp_ratio) if cfg.ffn_layer == "swiglu" else int(cfg.embed_dim * cfg.mlp_ratio)


def infer_config(sd: dict[str, Tensor], path: Path, head_dim: int = 64) -> ViTConfig:
    """Architecture from our-named backbone tensors. Heads cannot be seen in the weights: `head_dim`
    (64 for every DINOv2/CheXFound ViT) gives their number."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        raise CheckpointError(path, "no patch embedding (patch_embed.proj.weight, 4-D) among the backbone tensors")
    dim, chans, ph, pw = w.shape
    if ph != pw:
        raise CheckpointError(path, f"non-square patches {ph}x{pw} are not supported")
    pos = sd.get("pos_embed")
    if pos is None or pos.ndim != 3 or pos.shape[-1] != dim:
        raise CheckpointError(path, "no position embedding pos_embed of shape [1, 1 + N, dim]")
    n = pos.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise CheckpointError(path, f"pos_embed has {n} patch positions (+1 CLS): not a square grid; a layout "
                                    "without a CLS position (timm no_embed_class) is not supported")
    idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    if not idx:
        raise CheckpointError(path, "no transformer blocks (blocks.<i>.*) among the backbone tensors")
    if idx != list(range(len(idx))):
        gaps = sorted(set(range(idx[-1] + 1)) - set(idx))
        raise CheckpointError(path, f"blocks {gaps} are missing (found {len(idx)} blocks up to {idx[-1]})")
    if dim % head_dim:
        raise CheckpointError(path, f"embed dim {dim} is not a multiple of head dim {head_dim}; give the number of "
                                    "heads with a config")
    ffn: Literal["mlp", "swiglu"]
    if "blocks.0.mlp.w12.weight" in sd and "blocks.0.mlp.w3.weight" in sd:
        ffn, hidden = "swiglu", int(sd["blocks.0.mlp.w3.weight"].shape[1])
        ratio = next((r for r in (4.0, hidden * 1.5 / dim, hidden * 1.5 / dim + 1e-9) if swiglu_hidden(dim, r) == hidden), None)
    elif "blocks.0.mlp.fc1.weight" in sd:
        ffn, hidden = "mlp", int(sd["blocks.0.mlp.fc1.weight"].shape[0])
        ratio = hidden / dim if int(dim * (hidden / dim)) == hidden else None
    else:
        raise CheckpointError(path, "blocks have no recognised feed-forward weights (mlp.fc1/fc2 or packed SwiGLU "
                                    "mlp.w12/w3)")
    if ratio is None:
        raise CheckpointError(path, f"feed-forward hidden width {hidden} cannot be expressed as an mlp_ratio of {dim}")
    reg = sd.get("register_tokens")
    return ViTConfig(
        img_size=m * ph, patch_size=ph, in_chans=chans, embed_dim=dim, depth=len(idx), num_heads=dim // head_dim,
        mlp_ratio=ratio, num_register_tokens=int(reg.shape[1]) if reg is not None else 0, ffn_layer=ffn,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in sd else None,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, proj_bias="blocks.0.attn.proj.bias" in sd,
        ffn_bias=("blocks.0.mlp.w12.bias" if ffn == "swiglu" else "blocks.0.mlp.fc1.bias") in sd,
    )


def same_architecture(a: ViTConfig, b: ViTConfig) -> bool:
    return (all(getattr(a, f) == getattr(b, f) for f in _STRUCTURAL) and _ffn_hidden(a) == _ffn_hidden(b)
            and bool(a.layerscale_init) == bool(b.layerscale_init))


def match_registry(cfg: ViTConfig, prefer: str = "") -> str | None:
    """The named config with the same architecture (same input size first, then names starting `prefer`)."""
    hits = [n for n in list_configs() if same_architecture(cfg, get_config(n))]
    if not hits:
        return None
    hits.sort(key=lambda n: (get_config(n).img_size != cfg.img_size, not n.startswith(prefer), n))
    return hits[0]


def complete_from_registry(cfg: ViTConfig, name: str) -> ViTConfig:
    """Take the non-structural settings (interpolation rule, normalisation, name) from a named config."""
    ref = get_config(name)
    return replace(cfg, interpolate_offset=ref.interpolate_offset, interpolate_antialias=ref.interpolate_antialias,
                   mean=ref.mean, std=ref.std, minmax_rescale=ref.minmax_rescale, norm_eps=ref.norm_eps, name=name)
