"""Write a model's weights in the foreign key layouts we load (for the loader tests).

The Hugging Face layout is written out name by name here, independently of the loader's own map."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from chexfound.models import VisionTransformer, get_config
from chexfound.models.config import ViTConfig


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(p.shape[-1] ** -0.5 * torch.randn(p.shape, generator=g) if p.ndim > 1
                        else 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny(name: str = "tiny_vit", seed: int = 0, **overrides: object) -> VisionTransformer:
    """A registry model with every weight random (built on the meta device: `randomise` fills it all)."""
    with torch.device("meta"):
        model = VisionTransformer(replace(get_config(name), **overrides))  # type: ignore[arg-type]
    return randomise(model.to_empty(device="cpu"), seed)


def ssl_heads(dim: int, seed: int = 0) -> dict[str, Tensor]:
    """Small DINO/iBOT heads with the release's key names (weight-norm style last layers)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for head, bott in (("dino_head", 8), ("ibot_head", 6)):
        for j, (o, i) in enumerate([(16, dim), (16, 16), (bott, 16)]):
            out[f"{head}.mlp.{2 * j}.weight"] = torch.randn(o, i, generator=g)
            out[f"{head}.mlp.{2 * j}.bias"] = torch.randn(o, generator=g)
        out[f"{head}.last_layer.weight_g"] = torch.randn(32, 1, generator=g)
        out[f"{head}.last_layer.weight_v"] = torch.randn(32, bott, generator=g)
    return out


def official_teacher(sd: dict[str, Tensor], depth: int, chunks: int, heads: dict[str, Tensor]) -> dict:
    """{"teacher": {...}} as the release's train.py writes it: backbone. prefix, FSDP chunks
    `blocks.<chunk>.<absolute i>.` when chunks > 0."""
    size = depth // chunks if chunks else depth
    teacher = {}
    for k, v in sd.items():
        if chunks and k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // size}.{i}." + k.split(".", 2)[2]
        teacher[f"backbone.{k}"] = v.clone()
    teacher.update({k: v.clone() for k, v in heads.items()})
    return {"teacher": teacher}


def dinov2_yaml(cfg: ViTConfig, arch: str, chunks: int = 0) -> str:
    return f"""
MODEL:
  WEIGHTS: ''
student:
  arch: {arch}
  patch_size: {cfg.patch_size}
  drop_path_rate: 0.4
  layerscale: 1.0e-05
  drop_path_uniform: true
  ffn_layer: {"swiglufused" if cfg.ffn_layer == "swiglu" else "mlp"}
  block_chunks: {chunks}
  qkv_bias: true
  proj_bias: true
  ffn_bias: true
  num_register_tokens: {cfg.num_register_tokens}
  interpolate_antialias: false
  interpolate_offset: 0.1
crops:
  global_crops_size: {cfg.img_size}
  local_crops_size: 96
"""


def to_hf(sd: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    d = sd["cls_token"].shape[-1]
    hf = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    if "register_tokens" in sd:
        hf["embeddings.register_tokens"] = sd["register_tokens"]
    for i in range(depth):
        o, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            qkv = sd[f"{o}attn.qkv.{leaf}"]
            hf[f"{h}attention.attention.query.{leaf}"] = qkv[:d]
            hf[f"{h}attention.attention.key.{leaf}"] = qkv[d:2 * d]
            hf[f"{h}attention.attention.value.{leaf}"] = qkv[2 * d:]
            hf[f"{h}attention.output.dense.{leaf}"] = sd[f"{o}attn.proj.{leaf}"]
            hf[f"{h}norm1.{leaf}"] = sd[f"{o}norm1.{leaf}"]
            hf[f"{h}norm2.{leaf}"] = sd[f"{o}norm2.{leaf}"]
            if f"{o}mlp.w12.{leaf}" in sd:
                hf[f"{h}mlp.weights_in.{leaf}"] = sd[f"{o}mlp.w12.{leaf}"]
                hf[f"{h}mlp.weights_out.{leaf}"] = sd[f"{o}mlp.w3.{leaf}"]
            else:
                hf[f"{h}mlp.fc1.{leaf}"] = sd[f"{o}mlp.fc1.{leaf}"]
                hf[f"{h}mlp.fc2.{leaf}"] = sd[f"{o}mlp.fc2.{leaf}"]
        hf[f"{h}layer_scale1.lambda1"] = sd[f"{o}ls1.gamma"]
        hf[f"{h}layer_scale2.lambda1"] = sd[f"{o}ls2.gamma"]
    return {k: v.clone().contiguous() for k, v in hf.items()}


def hf_config(cfg: ViTConfig) -> dict:
    d = {
        "architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
        "patch_size": cfg.patch_size, "image_size": cfg.img_size, "num_channels": 3, "qkv_bias": True,
        "layer_norm_eps": 1e-6, "use_swiglu_ffn": cfg.ffn_layer == "swiglu", "hidden_act": "gelu",
        "layerscale_value": 1.0, "drop_path_rate": 0.0,
    }
    if cfg.num_register_tokens:
        d.update(model_type="dinov2_with_registers", architectures=["Dinov2WithRegistersModel"],
                 num_register_tokens=cfg.num_register_tokens)
    return d


def to_chexfound_hub(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official weights as published on the Hugging Face Hub: the original backbone's state dict
    (block_chunks=0) with every key prefixed `model.` and LayerScale saved as `ls1.weight` / `ls2.weight`."""
    out = {}
    for k, v in sd.items():
        if k.endswith((".ls1.gamma", ".ls2.gamma")):
            k = k[: -len("gamma")] + "weight"
        out["model." + k] = v if v.is_meta else v.clone().contiguous()
    return out
