"""A run folder's `config.yaml`: one writer, and the comparison a resume makes against it.

Every command that records its settings writes them with `write_run_config` (atomic, keys in the order given,
short lists inline). A command that resumes into a folder calls `check_run_config` first: a rerun whose
settings differ is refused with every differing key and both values, e.g.
`optim.base_lr: 0.001 (in the folder) != 0.1 (this run)`, so the user sees what to change back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from chexfound.errors import ConfigError
from chexfound.runio.atomic import atomic_write_text
from chexfound.runio.jsonsafe import json_safe

__all__ = ["check_run_config", "config_differences", "dump_run_config", "read_run_config", "write_run_config"]


def dump_run_config(cfg: Mapping[str, Any]) -> str:
    """The YAML text of `cfg` as every run folder stores it (JSON-safe values, insertion order)."""
    import yaml

    return yaml.safe_dump(json_safe(dict(cfg)), sort_keys=False, default_flow_style=None)


def write_run_config(path: str | PathLike[str], cfg: Mapping[str, Any]) -> Path:
    """Write `cfg` to `path` (a run folder's `config.yaml`, or `<name>.config.yaml`) atomically."""
    return atomic_write_text(path, dump_run_config(cfg))


def read_run_config(path: str | PathLike[str]) -> dict[str, Any]:
    """A YAML config file (a run's `config.yaml`, a preset) as a dict ({} for an empty file); a file that is not
    YAML, or not a mapping, is a ConfigError naming it."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(p, f"cannot read YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(p, "a config file must hold a mapping at the top level")
    return data


def _ignored(key: str, ignore: Iterable[str]) -> bool:
    # "a.b" ignores that key (and what is below it); "a." ignores everything under a.
    return any(key == k.rstrip(".") or key.startswith(k if k.endswith(".") else k + ".") for k in ignore)


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = (),
                       prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs; keys in `ignore` (see `_ignored`) are
    not compared. A key present on one side only differs with None on the other."""
    ignore = tuple(ignore)
    out: list[tuple[str, Any, Any]] = []
    for k in list(old) + [k for k in new if k not in old]:
        key = f"{prefix}{k}"
        if _ignored(key, ignore):
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, ignore, f"{key}.")
        elif json_safe(a) != json_safe(b):  # a tuple given and the list read back are the same setting
            out.append((key, a, b))
    return out


def check_run_config(path: str | PathLike[str], cfg: Mapping[str, Any], ignore: Iterable[str] = (),
                     what: str = "run") -> None:
    """Refuse to resume into the folder of `path` when its stored config differs from `cfg` (outside
    `ignore`): a ConfigError naming the file, each differing key and both values. No stored file: nothing to
    compare."""
    p = Path(path)
    if not p.is_file():
        return
    diff = config_differences(read_run_config(p), cfg, ignore)
    if diff:
        said = "; ".join(f"{k}: {a!r} (in the folder) != {b!r} (this {what})" for k, a, b in diff)
        raise ConfigError(p, f"{p.parent} holds a {what} with different settings ({said}); rerun with the same "
                          "settings to resume, or use another output folder")
