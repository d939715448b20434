"""Our ViT as a Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`: its `config.json` and its tensors
under the names `from_pretrained` reads (the inverse of `chexfound.models.loaders.hf`).

Names are the ones transformers keeps in files (`attention.attention.query`, `mlp.weights_in` /
`weights_out` for SwiGLU, `layer_scale1.lambda1`); transformers 5 renames the modules in memory on load
(`attention.q_proj`/`k_proj`/`v_proj`/`o_proj`, SwiGLU `weights_in` chunked in two halves into
`gate_proj` / `up_proj`, `weights_out` -> `down_proj`) and transformers 4 uses the file names as they are.
Our packed `w12` is [gate; value] and computes silu(gate) * value: the same halves in the same order.

What transformers cannot express is written so the outputs stay the same: no projection / FFN bias ->
zero biases (transformers always has them), no LayerScale -> `lambda1` of ones. What changes: inputs at
another resolution. Ours resizes the position embedding as the original (scale factor with offset
`interpolate_offset`, antialias `interpolate_antialias`); transformers resizes by output size, bicubic,
with antialiasing for Dinov2WithRegisters and without for Dinov2. At the native resolution (`img_size`)
no resizing happens and the outputs agree.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from chexfound.errors import ConfigError
from chexfound.models.config import ViTConfig
from chexfound.models.vit import VisionTransformer, swiglu_hidden

# transformers versions whose loading of these files the tests check (the model file names are the same in
# 4.x; the in-memory module names that a peft adapter targets are those of 5.x)
TRANSFORMERS_TESTED = ">=5.0,<6"


def hf_model_type(cfg: ViTConfig) -> str:
    return "dinov2_with_registers" if cfg.num_register_tokens else "dinov2"


def hf_architecture(cfg: ViTConfig, classifier: bool = False) -> str:
    base = "Dinov2WithRegisters" if cfg.num_register_tokens else "Dinov2"
    return base + ("ForImageClassification" if classifier else "Model")


def hf_base_prefix(cfg: ViTConfig) -> str:
    """The attribute under which a *ForImageClassification holds the backbone (its `base_model_prefix`)."""
    return hf_model_type(cfg)


def check_hf_expressible(cfg: ViTConfig) -> None:
    """Refuse what a transformers Dinov2 config cannot say (the error names the field)."""
    if cfg.mlp_ratio != int(cfg.mlp_ratio):
        raise ConfigError(None, f"mlp_ratio {cfg.mlp_ratio} is not an integer: transformers' Dinov2 config "
                                "takes an integer mlp_ratio")
    if cfg.ffn_layer == "swiglu":
        hf_hidden = (int(int(cfg.embed_dim * int(cfg.mlp_ratio)) * 2 / 3) + 7) // 8 * 8
        if hf_hidden != swiglu_hidden(cfg.embed_dim, cfg.mlp_ratio):  # the same rule; kept as a guard
            raise ConfigError(None, "SwiGLU hidden width differs from transformers' rule")
    if cfg.embed_dim % cfg.num_heads:
        raise ConfigError(None, f"embed_dim {cfg.embed_dim} is not a multiple of num_heads {cfg.num_heads}")


def hf_config(cfg: ViTConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`config.json` of the transformers model equivalent to `cfg` (weights written by `hf_state_dict`)."""
    check_hf_expressible(cfg)
    out: dict[str, Any] = {
        "architectures": [hf_architecture(cfg)],
        "model_type": hf_model_type(cfg),
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "mlp_ratio": int(cfg.mlp_ratio),
        "hidden_act": "gelu",  # exact GELU, as nn.GELU() in ours (used by the plain MLP only)
        "use_swiglu_ffn": cfg.ffn_layer == "swiglu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "layerscale_value": float(cfg.layerscale_init) if cfg.layerscale_init else 1.0,
        "dtype": "float32",
    }
    if cfg.num_register_tokens:
        out["num_register_tokens"] = cfg.num_register_tokens
    else:
        out["use_mask_token"] = True
    out.update(extra or {})
    return out


def hf_state_dict(model: VisionTransformer, prefix: str = "") -> dict[str, Tensor]:
    """Our backbone's weights under transformers' file names (fp32 copies; `prefix` e.g. `dinov2.`)."""
    cfg = model.cfg
    check_hf_expressible(cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    d = cfg.embed_dim
    out: dict[str, Tensor] = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    if cfg.num_register_tokens:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    def zeros() -> Tensor:  # a fresh tensor per missing bias: safetensors refuses shared storage
        return torch.zeros(d)

    for i in range(cfg.depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for n in ("norm1", "norm2"):
            out[f"{h}{n}.weight"], out[f"{h}{n}.bias"] = sd[f"{b}{n}.weight"], sd[f"{b}{n}.bias"]
        for part, w in zip(("query", "key", "value"), sd[f"{b}attn.qkv.weight"].chunk(3, dim=0)):
            out[f"{h}attention.attention.{part}.weight"] = w.clone()
        if cfg.qkv_bias:
            for part, bias in zip(("query", "key", "value"), sd[f"{b}attn.qkv.bias"].chunk(3, dim=0)):
                out[f"{h}attention.attention.{part}.bias"] = bias.clone()
        out[f"{h}attention.output.dense.weight"] = sd[f"{b}attn.proj.weight"]
        out[f"{h}attention.output.dense.bias"] = sd.get(f"{b}attn.proj.bias", zeros())
        for k, ls in ((1, "ls1"), (2, "ls2")):
            out[f"{h}layer_scale{k}.lambda1"] = sd.get(f"{b}{ls}.gamma", torch.ones(d))
        if cfg.ffn_layer == "swiglu":
            w12, w3 = f"{b}mlp.w12", f"{b}mlp.w3"
            out[f"{h}mlp.weights_in.weight"] = sd[f"{w12}.weight"]
            out[f"{h}mlp.weights_in.bias"] = sd.get(f"{w12}.bias", torch.zeros(sd[f"{w12}.weight"].shape[0]))
            out[f"{h}mlp.weights_out.weight"] = sd[f"{w3}.weight"]
            out[f"{h}mlp.weights_out.bias"] = sd.get(f"{w3}.bias", zeros())
        else:
            fc1, fc2 = f"{b}mlp.fc1", f"{b}mlp.fc2"
            out[f"{h}mlp.fc1.weight"] = sd[f"{fc1}.weight"]
            out[f"{h}mlp.fc1.bias"] = sd.get(f"{fc1}.bias", torch.zeros(sd[f"{fc1}.weight"].shape[0]))
            out[f"{h}mlp.fc2.weight"] = sd[f"{fc2}.weight"]
            out[f"{h}mlp.fc2.bias"] = sd.get(f"{fc2}.bias", zeros())
    return {prefix + k: v.contiguous() for k, v in out.items()}


def hf_lora_module(block: int, ours: str) -> list[str]:
    """The transformers-5 module names (as peft sees them on `AutoModel`) that our LoRA target
    `blocks.<block>.attn.<ours>` becomes: qkv -> the query, key and value projections (in that row order);
    proj -> the attention output projection."""
    h = f"encoder.layer.{block}.attention."
    if ours == "qkv":
        return [h + "q_proj", h + "k_proj", h + "v_proj"]
    if ours == "proj":
        return [h + "o_proj"]
    raise ValueError(f"no transformers module for LoRA target {ours!r} (expected qkv or proj)")
