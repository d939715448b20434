"""`create_backbone(name_or_path, checkpoint=None, ...)`: the one way to get a backbone, timm-style.

    create_backbone("chexfound_vitl16_reg4_512")                  # a named architecture, random weights
    create_backbone("vits16_224", depth=4, name="mini")            # ... changed by overrides: its own name
    create_backbone("chexfound_vitl16_reg4_512", checkpoint="teacher_checkpoint.pth")   # named arch + weights
    create_backbone("runs/demo/teacher_backbone.safetensors")      # any file chexfound reads (or its folder)
    create_backbone("hf://DIAL-RPI/CheXFound")                     # the Hugging Face Hub (`chexfound.models.hub`)
    create_backbone("chexfound-vitl16")                            # ... by the official weights' short name

Every model comes back in eval mode carrying `model.info` (`ModelInfo`: name, config, input transform,
weights SHA-256, source, provenance), which `save_backbone` writes into our file format.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import torch

from chexfound.errors import CheckpointError, ConfigError
from chexfound.models.config import ViTConfig
from chexfound.models.hub import SHORT_NAMES, is_hub_id, record, resolve_weights
from chexfound.models.info import ModelInfo, attach_info
from chexfound.models.registry import derive_config, list_configs
from chexfound.models.vit import VisionTransformer

NameOrPath = str | PathLike[str] | ViTConfig


def _is_name(spec: NameOrPath) -> bool:
    return isinstance(spec, str) and spec in list_configs() and not Path(spec).exists()


def create_backbone(
    name_or_path: NameOrPath,
    checkpoint: str | PathLike[str] | None = None,
    *,
    seed: int | None = None,
    config: Any = None,
    num_heads: int | None = None,
    head_dim: int | None = None,
    **overrides: Any,
) -> VisionTransformer:
    """A backbone from a registry name (random weights, or `checkpoint`'s loaded into that architecture), a
    ViTConfig, a file/folder or a Hugging Face Hub id (`hf://OWNER/NAME[@REVISION][/FILE]`, or a short name
    such as `chexfound-vitl16`: `chexfound.models.hub`) (`config`, `num_heads`, `head_dim`: for files that carry no architecture;
    see `chexfound.models.loaders.load_file`). `overrides` change ViTConfig fields of a named config (a
    changed model gets its own name: pass `name=`, or it is called `<base>[field=value,...]`). `seed` seeds
    torch's global RNG before a random initialisation (`torch.manual_seed(seed)`) and is recorded in the
    model's provenance."""
    if isinstance(name_or_path, ViTConfig) or _is_name(name_or_path):
        if config is not None or head_dim is not None:
            raise ConfigError(None, "config= and head_dim= are for files; a named architecture takes overrides "
                                    "(e.g. depth=4, num_heads=8)")
        if num_heads is not None:  # here simply the ViTConfig field
            overrides["num_heads"] = num_heads
        if isinstance(name_or_path, ViTConfig):
            cfg = derive_config_from(name_or_path, overrides)
        else:
            name = overrides.pop("name", None)
            cfg = derive_config(str(name_or_path), overrides, name=name)
        if checkpoint is not None:
            return _load(checkpoint, cfg)
        return _random(cfg, seed)
    if checkpoint is not None:
        raise ConfigError(None, f"checkpoint= goes with a named architecture; {name_or_path} is a file: pass it "
                                "alone (config= overrides the architecture it records)")
    if overrides:
        raise ConfigError(None, f"overrides {sorted(overrides)} apply to named configs; for the file "
                                f"{name_or_path} pass config= (a named config, ViTConfig or config file)")
    if is_hub_id(name_or_path):
        return _load(name_or_path, config, num_heads=num_heads, head_dim=head_dim)  # type: ignore[arg-type]
    p = Path(name_or_path)
    if not p.exists():
        s = str(name_or_path)
        looks_like_file = p.suffix != "" or "/" in s or "\\" in s
        if looks_like_file:
            raise CheckpointError(p, "file not found")
        raise ConfigError(None, f"unknown backbone config {s!r}: neither a file, a named config (known: "
                                f"{', '.join(list_configs())}) nor a Hugging Face Hub id (hf://OWNER/NAME or "
                                f"{', '.join(SHORT_NAMES)})")
    return _load(p, config, num_heads=num_heads, head_dim=head_dim)


def _load(spec: str | PathLike[str], config: Any, **kw: Any) -> VisionTransformer:
    """A file, folder or Hub id -> the loaded model, with the Hub file's provenance in `info.origin`."""
    from chexfound.models.loaders import load_file

    weights = resolve_weights(spec)
    model = load_file(weights.local, config, **kw)
    record(model.info.origin, weights)  # type: ignore[union-attr]
    return model


def derive_config_from(cfg: ViTConfig, overrides: dict[str, Any]) -> ViTConfig:
    from dataclasses import replace

    return replace(cfg, **overrides) if overrides else cfg


def _random(cfg: ViTConfig, seed: int | None) -> VisionTransformer:
    from chexfound.data.transform import InputTransform
    from chexfound.models.format import state_dict_sha256

    if seed is not None:
        torch.manual_seed(seed)  # as callers did before the resolver: same weights, same RNG state after
    model = VisionTransformer(cfg).eval()
    # Built under `torch.device("meta")` (to count parameters, or to load weights later) there is nothing to hash.
    on_meta = model.pos_embed.is_meta
    info = ModelInfo(
        name=cfg.name, config=cfg, transform=InputTransform.for_backbone(cfg),
        weights_sha256="" if on_meta else state_dict_sha256(model.state_dict()),
        source=f"registry:{cfg.extra.get('derived_from', cfg.name)}",
        format="random", config_source="named config" + (" with overrides" if "derived_from" in cfg.extra else ""),
        origin={"random_init": {"seed": seed}})
    return attach_info(model, info)  # type: ignore[return-value]
