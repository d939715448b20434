"""Pretraining configs: YAML presets layered over `ssl_default.yaml`, plus `key.sub=value` overrides.

Every key must exist in the default config (typos are errors), except under dicts whose default is `{}`
(`student.overrides`, `augment.overrides`), which are open. Values of overrides are parsed as YAML, so
`optim.base_lr=1e-3`, `crops.global_crops_scale=[0.4,1.0]` and `train.time_budget_s=null` all work.
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable


from chexfound.errors import ConfigError
from chexfound.runio import DATA_ENV, config_differences, data_root, dump_run_config, read_run_config, set_dotted
from chexfound.runio import parse_overrides as _parse_overrides

CONFIG_PACKAGE_DIR = "configs"
DEFAULT_NAME = "ssl_default"


def preset_dir() -> Path:
    return Path(str(resources.files("chexfound") / CONFIG_PACKAGE_DIR))


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml") if p.stem != DEFAULT_NAME)


def _load_yaml(path: Path) -> dict[str, Any]:
    return read_run_config(path)


def default_config() -> dict[str, Any]:
    return _load_yaml(preset_dir() / f"{DEFAULT_NAME}.yaml")


def resolve_preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(p, "config file not found")
        return p
    q = preset_dir() / f"{name_or_path}.yaml"
    if not q.is_file():
        raise ConfigError(None, f"unknown preset {name_or_path!r}; presets: {', '.join(list_presets())}")
    return q


def _merge(base: dict[str, Any], over: dict[str, Any], where: str, source: Path | None) -> None:
    for k, v in over.items():
        key = f"{where}{k}"
        if k not in base:
            raise ConfigError(source, f"unknown config key {key!r}")
        if isinstance(base[k], dict) and base[k] and isinstance(v, dict):
            _merge(base[k], v, f"{key}.", source)
        elif isinstance(base[k], dict) and not base[k]:
            if not isinstance(v, dict):
                raise ConfigError(source, f"{key} must be a mapping")
            base[k] = copy.deepcopy(v)  # open dict
        else:
            base[k] = copy.deepcopy(v)


def set_key(cfg: dict[str, Any], dotted: str, value: Any, source: Path | None = None) -> None:
    """Set `a.b.c` in cfg; only keys of the default config (or keys under an open `{}` dict) may be set, and an
    unknown one is refused with the known keys listed."""
    set_dotted(cfg, dotted, value, schema=default_config(), source=source)


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` items -> (key, value) pairs (the one parser: `chexfound.runio.parse_overrides`)."""
    return _parse_overrides(items)


def load_config(preset: str | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """default <- preset <- overrides; validated."""
    cfg = default_config()
    if preset:
        path = resolve_preset_path(preset)
        _merge(cfg, _load_yaml(path), "", path)
        cfg["_preset"] = path.stem
    else:
        cfg["_preset"] = DEFAULT_NAME
    for k, v in parse_overrides(overrides):
        set_key(cfg, k, v)
    validate(cfg)
    return cfg


def expand_path(p: str | os.PathLike[str]) -> Path:
    """`${CHEXFOUND_DATA}` and `~` in config paths; CHEXFOUND_DATA defaults to `chexfound.runio.data_root()`."""
    data = str(data_root())
    s = str(p).replace("${" + DATA_ENV + "}", data).replace("$" + DATA_ENV, data)
    return Path(os.path.expanduser(os.path.expandvars(s)))


def validate(cfg: dict[str, Any]) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(None, msg)

    need(cfg["centering"] in ("sinkhorn_knopp", "softmax"), "centering must be sinkhorn_knopp or softmax")
    need(cfg["train"]["dtype"] in ("auto", "fp32", "bf16", "fp16"), "train.dtype must be auto|fp32|bf16|fp16")
    need(cfg["train"]["distributed"] in ("ddp", "fsdp"), "train.distributed must be ddp or fsdp")
    need(cfg["data"]["pipeline"] in ("auto", "preload", "loader"), "data.pipeline must be auto|preload|loader")
    need(cfg["optim"]["scaling_rule"] in ("sqrt_wrt_1024", "linear_wrt_1024", "none"),
         "optim.scaling_rule must be sqrt_wrt_1024|linear_wrt_1024|none")
    need(cfg["train"]["pos_embed_on_resize"] in ("interpolate", "reinit"),
         "train.pos_embed_on_resize must be interpolate or reinit")
    need(int(cfg["train"]["batch_size_per_gpu"]) >= 1, "train.batch_size_per_gpu must be >= 1")
    need(int(cfg["train"]["epoch_length"]) >= 1, "train.epoch_length must be >= 1")
    need(int(cfg["crops"]["local_crops_number"]) >= 0, "crops.local_crops_number must be >= 0")
    lo, hi = cfg["ibot"]["mask_ratio_min_max"]
    need(0.0 <= lo <= hi <= 1.0, "ibot.mask_ratio_min_max must be 0 <= min <= max <= 1")
    for k in ("global_crops_scale", "local_crops_scale"):
        a, b = cfg["crops"][k]
        need(0.0 < a <= b <= 1.0, f"crops.{k} must be 0 < min <= max <= 1")
    need(cfg["dino"]["head_n_prototypes"] >= 2, "dino.head_n_prototypes must be >= 2")
    need(cfg["dino"]["head_precision"] in ("autocast", "fp32"), "dino.head_precision must be autocast or fp32")
    for k in ("warmup_iterations", "freeze_last_layer_iterations"):
        v = cfg["optim"][k]
        need(v is None or (isinstance(v, (int, float)) and float(v).is_integer() and v >= 0),
             f"optim.{k} must be null or a whole number >= 0")


def dump_config(cfg: dict[str, Any]) -> str:
    """The YAML of a config as run folders and checkpoints store it (`chexfound.runio.dump_run_config`)."""
    return dump_run_config(cfg)


def diff_configs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (`chexfound.runio.config_differences` gives the values too)."""
    return sorted(k for k, _, _ in config_differences(a, b))
