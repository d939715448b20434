"""Named backbone configs, timm-style: `create_backbone("chexfound_vitl16_reg4_512")`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from chexfound.models.config import ViTConfig
from chexfound.models.vit import VisionTransformer

_REGISTRY: dict[str, Callable[[], ViTConfig]] = {}


def register(name: str) -> Callable[[Callable[[], ViTConfig]], Callable[[], ViTConfig]]:
    def deco(fn: Callable[[], ViTConfig]) -> Callable[[], ViTConfig]:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_configs() -> list[str]:
    return sorted(_REGISTRY)


def get_config(name: str, **overrides: Any) -> ViTConfig:
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone config {name!r}; known: {', '.join(list_configs())}")
    cfg = replace(_REGISTRY[name](), name=name)
    return replace(cfg, **overrides) if overrides else cfg


def create_backbone(name: str, **overrides: Any) -> VisionTransformer:
    return VisionTransformer(get_config(name, **overrides))


_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}


@register("chexfound_vitl16_reg4_512")
def _chexfound() -> ViTConfig:
    return ViTConfig(img_size=512, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                     num_register_tokens=4, ffn_layer="swiglu", layerscale_init=1e-5)


def _dinov2(size: str, reg: int) -> Callable[[], ViTConfig]:
    d, depth, heads = _SIZES[size]

    def make() -> ViTConfig:
        return ViTConfig(img_size=518, patch_size=14, embed_dim=d, depth=depth, num_heads=heads,
                         num_register_tokens=reg, ffn_layer="swiglu" if size == "g" else "mlp",
                         layerscale_init=1.0, interpolate_offset=0.0 if reg else 0.1,
                         interpolate_antialias=bool(reg),
                         minmax_rescale=False)

    return make


for _s in "sblg":
    register(f"dinov2_vit{_s}14")(_dinov2(_s, 0))
    register(f"dinov2_vit{_s}14_reg4")(_dinov2(_s, 4))


@register("rad_dino_vitb14")
def _rad_dino() -> ViTConfig:
    return ViTConfig(img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12,
                     num_register_tokens=0, ffn_layer="mlp", layerscale_init=1.0,
                     mean=(0.5307, 0.5307, 0.5307), std=(0.2583, 0.2583, 0.2583), minmax_rescale=False)


@register("vits16_224")
def _vits16() -> ViTConfig:
    return ViTConfig(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_register_tokens=4,
                     ffn_layer="mlp", layerscale_init=1e-5)


@register("tiny_vit")
def _tiny() -> ViTConfig:
    """For tests: 2 blocks, 64 px, patch 16, dim 64, 2 registers, SwiGLU."""
    return ViTConfig(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_register_tokens=2,
                     ffn_layer="swiglu", layerscale_init=1e-5)


@register("tiny_vit_mlp")
def _tiny_mlp() -> ViTConfig:
    return ViTConfig(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, num_register_tokens=0,
                     ffn_layer="mlp", layerscale_init=None)
