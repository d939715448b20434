"""Named backbone configs, timm-style: `create_backbone("chexfound_vitl16_reg4_512")`.

Only architectures someone would deploy live here. The tiny configs the tests use are registered by
`chexfound.models.testing` (imported by the test suite, and in any process whose CHEXFOUND_MODEL_MODULES
names it).
A config changed by overrides is a different model: `derive_config` gives it its own name (e.g. the
pretraining preset that made it) and records what it was derived from.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any, Callable

from chexfound.errors import ConfigError
from chexfound.models.config import ViTConfig

_REGISTRY: dict[str, Callable[[], ViTConfig]] = {}
# Architectures of released weights (DINOv2, CheXFound, RAD-DINO): a checkpoint without a config whose tensors
# match one of these exactly is that release, so its head count may be taken from here.
RELEASED: set[str] = set()
# Settings that change training only, not the function a trained model computes.
_TRAINING_ONLY = ("drop_path_rate", "drop_path_uniform", "name", "extra")
# Modules that register more configs (comma-separated import names), imported on first use of the registry:
# how the test suite, and the CLI processes it starts, reach `chexfound.models.testing`; users can add their own.
MODULES_ENV = "CHEXFOUND_MODEL_MODULES"
_imported: set[str] = set()


def register(name: str, released: bool = False) -> Callable[[Callable[[], ViTConfig]], Callable[[], ViTConfig]]:
    def deco(fn: Callable[[], ViTConfig]) -> Callable[[], ViTConfig]:
        _REGISTRY[name] = fn
        if released:
            RELEASED.add(name)
        return fn

    return deco


def _import_modules() -> None:
    for mod in os.environ.get(MODULES_ENV, "").split(","):
        mod = mod.strip()
        if mod and mod not in _imported:
            _imported.add(mod)
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise ConfigError(None, f"{MODULES_ENV}: cannot import {mod!r} ({e})") from e


def list_configs() -> list[str]:
    """Names of the registered backbone configs (the tiny test configs only where `chexfound.models.testing` was
    imported)."""
    _import_modules()
    return sorted(_REGISTRY)


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """The registered config `name`, with `overrides` applied (ConfigError naming the known configs if there is
    none)."""
    _import_modules()
    if name not in _REGISTRY:
        hint = (f" (the tiny test configs are registered by importing chexfound.models.testing, e.g. with "
                f"{MODULES_ENV}=chexfound.models.testing)" if name.startswith("tiny_") else "")
        raise ConfigError(None, f"unknown backbone config {name!r}; known: {', '.join(list_configs())}{hint}")
    cfg = replace(_REGISTRY[name](), name=name)
    return replace(cfg, **overrides) if overrides else cfg


def derive_config(base: str, overrides: Mapping[str, Any] | None = None, name: str | None = None,
                  **fields_: Any) -> ViTConfig:
    """Registry entry `base` with `overrides` (and keyword `fields_`) applied. When that changes the model, the
    result is named `name` (e.g. the pretraining preset) or, without one, `base` plus the changes, and
    `extra` records `derived_from` and the changed fields: a derived model never carries its base's name."""
    ref = get_config(base)
    changes = {**dict(overrides or {}), **fields_}
    known = {f.name for f in fields(ViTConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigError(None, f"unknown ViTConfig fields in the overrides of {base!r}: {unknown}")
    changes.pop("name", None)
    cfg = replace(ref, **changes)
    differ = {k: getattr(cfg, k) for k in sorted(changes)
              if k not in _TRAINING_ONLY and getattr(cfg, k) != getattr(ref, k)}
    if not differ:
        return cfg
    label = name or base + "[" + ",".join(f"{k}={v}" for k, v in differ.items()) + "]"
    return replace(cfg, name=label, extra={**cfg.extra, "derived_from": base,
                                          "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in differ.items()}})


_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}


@register("chexfound_vitl16_reg4_512", released=True)
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
    register(f"dinov2_vit{_s}14", released=True)(_dinov2(_s, 0))
    register(f"dinov2_vit{_s}14_reg4", released=True)(_dinov2(_s, 4))


@register("rad_dino_vitb14", released=True)
def _rad_dino() -> ViTConfig:
    return ViTConfig(img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12,
                     num_register_tokens=0, ffn_layer="mlp", layerscale_init=1.0,
                     mean=(0.5307, 0.5307, 0.5307), std=(0.2583, 0.2583, 0.2583), minmax_rescale=False)


@register("vits16_224")
def _vits16() -> ViTConfig:
    return ViTConfig(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_register_tokens=4,
                     ffn_layer="mlp", layerscale_init=1e-5)
