"""JSON-safe values: what numbers, arrays and paths become in every JSON file the project writes."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import math
from collections.abc import Mapping
from os import PathLike
from typing import Any

import numpy as np

__all__ = ["json_safe"]


def json_safe(obj: Any) -> Any:
    """`obj` with every value turned into a JSON type, recursively.

    numpy scalars and arrays, torch tensors -> numbers / nested lists; NaN and +-inf -> None (JSON has no such
    numbers, and a strict reader rejects them); paths -> str; dataclasses -> dicts; sets -> sorted lists (a
    stable file for the same set); tuples -> lists; enums -> their value; dates and times -> ISO-8601 strings;
    mapping keys -> str. Anything else that JSON cannot hold raises TypeError rather than being written as an
    opaque string."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)  # numpy's str_ is a str subclass: hand out the plain one
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (complex, np.complexfloating)):
        raise TypeError(f"a complex number ({obj!r}) has no JSON form")
    if isinstance(obj, Mapping):
        return {_key(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [json_safe(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:  # mixed types: still one stable order
            return sorted(items, key=lambda v: (type(v).__name__, str(v)))
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):  # numpy str_/bytes_/datetime64 and friends
        return json_safe(obj.item())
    if isinstance(obj, PathLike):
        return str(obj.__fspath__())
    if isinstance(obj, enum.Enum):
        return json_safe(obj.value)
    if isinstance(obj, (_dt.datetime, _dt.date, _dt.time)):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: json_safe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if _is_tensor(obj):
        return json_safe(obj.detach().cpu().tolist())
    if isinstance(obj, bytes):
        raise TypeError("bytes have no JSON form; encode them (base64, hex) first")
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable: {obj!r:.80}")


def _key(k: Any) -> str:
    if isinstance(k, str):
        return k
    v = json_safe(k)
    return v if isinstance(v, str) else str(v)


def _is_tensor(obj: Any) -> bool:
    # Without importing torch: a runio user that never touched torch should not pay for it here.
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)
