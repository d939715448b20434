"""Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` checkpoints (how RAD-DINO ships:
`model.safetensors` + `config.json` [+ `preprocessor_config.json`]).

Name map (HF -> ours), per layer i:
  embeddings.cls_token / mask_token / register_tokens     -> cls_token / mask_token / register_tokens
  embeddings.position_embeddings                          -> pos_embed
  embeddings.patch_embeddings.projection.{weight,bias}    -> patch_embed.proj.*
  encoder.layer.i.norm1 / norm2                           -> blocks.i.norm1 / norm2
  encoder.layer.i.attention.attention.{query,key,value}   -> blocks.i.attn.qkv  (rows stacked [q; k; v])
  encoder.layer.i.attention.output.dense                  -> blocks.i.attn.proj
  encoder.layer.i.layer_scale{1,2}.lambda1                -> blocks.i.ls{1,2}.gamma
  encoder.layer.i.mlp.fc1 / fc2                           -> blocks.i.mlp.fc1 / fc2       (GELU MLP)
  encoder.layer.i.mlp.weights_in / weights_out            -> blocks.i.mlp.w12 / w3        (packed SwiGLU)
  layernorm                                               -> norm
A `dinov2.` prefix (from *ForImageClassification) is stripped; `classifier.*` is kept as a head.

Position-embedding resizing for other input sizes: current transformers resizes Dinov2 by output size,
bicubic, no antialias, and Dinov2WithRegisters by output size, bicubic, antialias=True. The loaded model
does exactly that (interpolate_offset=0 -> explicit size). transformers before 4.45 used the original's
scale-factor "+0.1" kludge for Dinov2; pass a config with interpolate_offset=0.1 to reproduce those
numbers. At the native size (518 px for RAD-DINO) every variant is identical.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chexfound.errors import CheckpointError
from chexfound.models.config import IMAGENET_MEAN, IMAGENET_STD, ViTConfig
from chexfound.models.loaders.keys import Filtered, strip_prefixes

HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
HF_HEADS = ("classifier",)

_EMB = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER = {
    "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def looks_hf(keys: list[str]) -> bool:
    return any(k.startswith(("embeddings.patch_embeddings.", "dinov2.embeddings.")) for k in keys)


def filter_hf_dinov2(sd: dict[str, Tensor], path: Path) -> Filtered:
    """Map a Hugging Face Dinov2 state dict to our names. Unknown keys are passed through unchanged so the
    strict load reports them."""
    sd = {strip_prefixes(k, ("dinov2.",)): v for k, v in sd.items()}
    out = Filtered(backbone={})
    qkv: dict[int, dict[str, Tensor]] = {}
    for k, v in sd.items():
        head = next((h for h in HF_HEADS if k.startswith(h + ".")), None)
        if head:
            out.heads.setdefault(head, {})[k[len(head) + 1 :]] = v
            continue
        if k in _EMB:
            out.backbone[_EMB[k]] = v
            continue
        m = _LAYER_RE.match(k)
        if not m:
            out.backbone[k] = v
            continue
        i, mod, leaf = int(m.group(1)), m.group(2), m.group(3)
        if mod.startswith("attention.attention.") and mod.rsplit(".", 1)[1] in ("query", "key", "value"):
            qkv.setdefault(i, {})[f"{mod.rsplit('.', 1)[1]}.{leaf}"] = v
        elif mod in ("layer_scale1", "layer_scale2") and leaf == "lambda1":
            out.backbone[f"blocks.{i}.ls{mod[-1]}.gamma"] = v
        elif mod in _LAYER and leaf in ("weight", "bias"):
            out.backbone[f"blocks.{i}.{_LAYER[mod]}.{leaf}"] = v
        else:
            out.backbone[k] = v
    for i, parts in sorted(qkv.items()):
        for leaf in ("weight", "bias"):
            have = [p for p in ("query", "key", "value") if f"{p}.{leaf}" in parts]
            if not have:
                continue
            if len(have) != 3:
                missing = sorted({"query", "key", "value"} - set(have))
                raise CheckpointError(path, f"layer {i}: attention {leaf} has {have} but not {missing}")
            out.backbone[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(
                [parts[f"{p}.{leaf}"] for p in ("query", "key", "value")], dim=0
            )
    out.notes.append("Hugging Face Dinov2 names mapped (query/key/value stacked into qkv)")
    return out


def config_from_hf(cfg: dict[str, Any], source: str | Path, preprocessor: dict[str, Any] | None = None) -> ViTConfig:
    """ViTConfig from a transformers `config.json` (model_type dinov2 / dinov2_with_registers)."""
    mt = cfg.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise CheckpointError(source, f"config.json has model_type {mt!r}; supported Hugging Face models: "
                                      f"{', '.join(HF_MODEL_TYPES)}")
    act = cfg.get("hidden_act", "gelu")
    swiglu = bool(cfg.get("use_swiglu_ffn", False))
    if not swiglu and act != "gelu":
        raise CheckpointError(source, f"hidden_act {act!r} is not supported (only exact 'gelu' MLPs or SwiGLU)")
    image_size = cfg.get("image_size", 518)
    patch = cfg.get("patch_size", 14)
    if isinstance(image_size, (list, tuple)) or isinstance(patch, (list, tuple)):
        raise CheckpointError(source, "non-square image_size/patch_size in config.json is not supported")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if preprocessor:
        m, s = preprocessor.get("image_mean"), preprocessor.get("image_std")
        if isinstance(m, list) and isinstance(s, list) and len(m) == len(s) == 3:
            mean, std = tuple(float(x) for x in m), tuple(float(x) for x in s)
    layerscale = float(cfg.get("layerscale_value", 1.0))
    return ViTConfig(
        img_size=int(image_size), patch_size=int(patch), in_chans=int(cfg.get("num_channels", 3)),
        embed_dim=int(cfg["hidden_size"]), depth=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]), mlp_ratio=float(cfg.get("mlp_ratio", 4)),
        num_register_tokens=int(cfg.get("num_register_tokens", 0)) if mt == "dinov2_with_registers" else 0,
        ffn_layer="swiglu" if swiglu else "mlp", layerscale_init=layerscale or 1.0,  # HF always has LayerScale
        qkv_bias=bool(cfg.get("qkv_bias", True)), proj_bias=True, ffn_bias=True,
        norm_eps=float(cfg.get("layer_norm_eps", 1e-6)), drop_path_rate=float(cfg.get("drop_path_rate", 0.0)),
        interpolate_offset=0.0, interpolate_antialias=mt == "dinov2_with_registers",
        mean=mean, std=std, minmax_rescale=False,  # type: ignore[arg-type]
    )


def hf_uses_mask_token(cfg: dict[str, Any] | None) -> bool:
    return bool((cfg or {}).get("use_mask_token", True))
