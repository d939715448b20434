"""`key.sub=value` overrides, the one parser every command uses (`--set key.sub=value` on the command line).

Values are YAML scalars or flow collections (`null`, `true`, `[0.4, 1.0]`, `{a: 1}`); a number written without a
dot (`1e-3`, which YAML 1.1 reads as a string) is a float, because on a command line it means a number. With a
`schema` (the defaults), only keys that exist there may be set, and an unknown key is refused with the keys
known at that level listed; below a key whose default is an empty mapping `{}` everything is free-form.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from os import PathLike
from typing import Any

from chexfound.errors import ConfigError

__all__ = ["apply_overrides", "parse_override", "parse_overrides", "set_dotted"]


def _number_if_numeric(val: Any) -> Any:
    if isinstance(val, str):
        try:
            return float(val)
        except ValueError:
            return val
    return val


def parse_override(item: str, source: str | PathLike[str] | None = None) -> tuple[str, Any]:
    """`key.sub=value` -> ("key.sub", value parsed as YAML)."""
    import yaml

    if "=" not in item:
        raise ConfigError(source, f"override {item!r} is not of the form key.sub=value")
    k, v = item.split("=", 1)
    if not k.strip():
        raise ConfigError(source, f"override {item!r} has no key")
    try:
        val = yaml.safe_load(v)
    except yaml.YAMLError as e:
        raise ConfigError(source, f"override {item!r}: value is not valid YAML ({e})") from e
    return k.strip(), _number_if_numeric(val)


def parse_overrides(items: Iterable[str], source: str | PathLike[str] | None = None) -> list[tuple[str, Any]]:
    """Every `key.sub=value` of `items`, parsed (see `parse_override`)."""
    return [parse_override(it, source) for it in items]


def _known(node: Any) -> str:
    return ", ".join(sorted(map(str, node))) if isinstance(node, Mapping) else "none"


def set_dotted(tree: dict[str, Any], dotted: str, value: Any, schema: Mapping[str, Any] | None = None,
               source: str | PathLike[str] | None = None) -> None:
    """Set `a.b.c` in `tree` to `value`. Without a schema, missing (or null) mappings on the way are created;
    with one, every key must exist in it (see the module docstring)."""
    parts = dotted.split(".")
    node: Any = tree
    snode: Any = schema
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if schema is not None:
            if isinstance(snode, Mapping) and part in snode:
                snode = snode[part]
            else:
                where = f" under {'.'.join(parts[:i])!r}" if i else ""
                raise ConfigError(source, f"unknown config key {here!r}; known keys{where}: {_known(snode)}")
            if isinstance(snode, Mapping) and not snode and not last:
                # An open mapping: everything below it is free-form.
                if not isinstance(node, dict):
                    raise ConfigError(source, f"override {dotted!r}: {'.'.join(parts[:i])} is not a mapping")
                if node.get(part) is None:
                    node[part] = {}
                set_dotted(node[part], ".".join(parts[i + 1:]), value, None, source)
                return
        if last:
            if not isinstance(node, dict):
                raise ConfigError(source, f"override {dotted!r}: {'.'.join(parts[:i])} is not a mapping")
            node[part] = value
            return
        if not isinstance(node, dict):
            raise ConfigError(source, f"override {dotted!r}: {'.'.join(parts[:i])} is not a mapping")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]


def apply_overrides(tree: dict[str, Any], items: Iterable[str], schema: Mapping[str, Any] | None = None,
                    source: str | PathLike[str] | None = None) -> dict[str, Any]:
    """Parse and apply every `key.sub=value` of `items` to `tree` (in place; also returned)."""
    for key, val in parse_overrides(items, source):
        set_dotted(tree, key, val, schema, source)
    return tree
