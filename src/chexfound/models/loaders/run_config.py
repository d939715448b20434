"""Our own pretraining run's `config.yaml`: `student.arch` (a registry name) + `student.overrides`, the global
crop size as the input size, and `_preset` naming the recipe.

`chexfound pretrain` writes it into every run folder beside `teacher_checkpoint.pth`; it looks like a DINOv2
SSL config (a `student:` mapping) but names the architecture differently, so it has its own reader. The
pretraining model itself is built from the same function (`chexfound.ssl.meta_arch.backbone_config`), so a
converted run is the model that was trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chexfound.errors import ConfigError
from chexfound.models.config import ViTConfig
from chexfound.models.registry import derive_config, list_configs


def is_run_config(d: Any) -> bool:
    """A chexfound pretraining config (as opposed to a DINOv2/CheXFound release config)."""
    if not isinstance(d, Mapping) or not isinstance(d.get("student"), Mapping):
        return False
    s = d["student"]
    return "_preset" in d or "overrides" in s or str(s.get("arch")) in list_configs()


def config_from_run(d: Mapping[str, Any], source: str | Path | None = None) -> ViTConfig:
    """The teacher's architecture: registry entry + overrides at the global crop size, named after the preset
    when the overrides change it (e.g. `demo_tiny`, not the `vits16_224` it was derived from)."""
    s = d["student"]
    arch = str(s.get("arch"))
    if arch not in list_configs():
        raise ConfigError(source, f"student.arch {arch!r} is not a named backbone config (known: "
                                  f"{', '.join(list_configs())})")
    overrides = s.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(source, f"student.overrides must be a mapping, got {type(overrides).__name__}")
    size = (d.get("crops") or {}).get("global_crops_size")
    fields: dict[str, Any] = {"img_size": int(size)} if size else {}
    preset = d.get("_preset")
    try:
        return derive_config(arch, overrides, name=str(preset) if preset else None, **fields)
    except ConfigError as e:
        raise ConfigError(source, e.reason) from e
    except (TypeError, ValueError) as e:
        raise ConfigError(source, f"student.overrides: {e}") from e
