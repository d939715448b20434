"""State-dict plumbing shared by the loaders: unwrap containers, strip prefixes, un-chunk blocks, and
summarise long key lists for error messages."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chexfound.errors import CheckpointError

# Containers that training frameworks wrap a state dict in, in the order we look for them.
# "teacher" first: DINOv2/CheXFound eval always uses the EMA teacher.
_WRAPPERS = ("teacher", "model", "state_dict", "model_state_dict", "module", "net", "network")
# Prefixes that wrappers (DDP, torch.compile) put in front of every key.
_NOISE_PREFIXES = ("module.", "_orig_mod.")
# Self-supervised heads a DINOv2-style checkpoint carries beside the backbone.
SSL_HEADS = ("dino_head", "ibot_head")


@dataclass
class RawStateDict:
    """Tensors of a checkpoint after unwrapping, plus what was deliberately left out (reported, not hidden)."""

    tensors: dict[str, Tensor]
    wrapper: list[str] = field(default_factory=list)  # container keys descended into, e.g. ["teacher"]
    ignored: list[str] = field(default_factory=list)  # keys/entries not used, with a reason
    # Our own description of the weights inside a torch checkpoint (the `chexfound` entry that pretraining
    # exports write beside {"teacher": ...}): config, transform, provenance.
    embedded: dict[str, Any] | None = None


@dataclass
class Filtered:
    """A foreign checkpoint mapped to our backbone names, with its heads kept apart."""

    backbone: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Our tensor name -> the file's, for error messages of layouts that rename (None: the names are the same).
    file_key: Callable[[str], str] | None = None


def unwrap_state_dict(obj: Any, path: Path) -> RawStateDict:
    """Descend through {"teacher": ...}, {"model": ...}, {"state_dict": ...} wrappers to the tensors.

    A whole-training checkpoint (`teacher.`/`student.` keys, loss centres) keeps the teacher only; the rest
    is listed in `ignored`. Non-tensor entries (iteration counters, optimizer state) are listed too.
    """
    raw = RawStateDict(tensors={})
    for _ in range(len(_WRAPPERS) + 1):
        if not isinstance(obj, Mapping):
            raise CheckpointError(path, f"contains a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
        inner = next((w for w in _WRAPPERS if isinstance(obj.get(w), Mapping) and obj.get(w)), None)
        if inner is None:
            break
        raw.ignored += [f"{k} (top-level entry beside {inner!r})" for k in obj if k != inner]
        raw.wrapper.append(inner)
        obj = obj[inner]
    tensors: dict[str, Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, Tensor):
            tensors[str(k)] = v
        else:
            raw.ignored.append(f"{k} (not a tensor: {type(v).__name__})")
    tensors = {strip_prefixes(k, _NOISE_PREFIXES): v for k, v in tensors.items()}
    # A full SSL training state (fvcore model_checkpoint.pth): keep the EMA teacher.
    if any(k.startswith("teacher.") for k in tensors):
        others = Counter(k.split(".", 1)[0] for k in tensors if not k.startswith("teacher."))
        raw.ignored += [f"{p}.* ({n} tensors; only the teacher is loaded)" for p, n in sorted(others.items())]
        tensors = {k[len("teacher.") :]: v for k, v in tensors.items() if k.startswith("teacher.")}
        raw.wrapper.append("teacher.")
    raw.tensors = {strip_prefixes(k, _NOISE_PREFIXES): v for k, v in tensors.items()}
    if not raw.tensors:
        raise CheckpointError(path, "contains no tensors")
    return raw


def strip_prefixes(key: str, prefixes: Iterable[str]) -> str:
    prefixes = tuple(prefixes)
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")


def unchunk_blocks(sd: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], int]:
    """`blocks.<chunk>.<i>.x` (FSDP block chunks; `i` is the absolute block index) -> `blocks.<i>.x`.
    Returns the new dict and the number of chunks seen (0 for a flat layout)."""
    out: dict[str, Tensor] = {}
    chunk_of: dict[int, int] = {}
    for k, v in sd.items():
        m = _CHUNKED.match(k)
        if m:
            c, i, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if chunk_of.setdefault(i, c) != c:
                raise CheckpointError(path, f"block {i} appears in block chunks {chunk_of[i]} and {c}")
            k = f"blocks.{i}.{rest}"
        if k in out:
            raise CheckpointError(path, f"key {k!r} appears both chunked and flat")
        out[k] = v
    return out, len(set(chunk_of.values()))


def split_heads(sd: dict[str, Tensor], head_names: Iterable[str]) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """Move `<head>.<param>` keys into their own state dicts."""
    names = tuple(head_names)
    rest: dict[str, Tensor] = {}
    heads: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        head = next((n for n in names if k.startswith(n + ".")), None)
        if head is None:
            rest[k] = v
        else:
            heads.setdefault(head, {})[k[len(head) + 1 :]] = v
    return rest, heads


def summarise_keys(keys: Iterable[str], limit: int = 12) -> str:
    """'blocks.{0..23}.mlp.fc1.weight, cls_token, ...': block indices folded so 24-block lists stay short."""
    groups: dict[str, list[int]] = {}
    for k in keys:
        m = re.match(r"^(.*?blocks\.)(\d+)(\..*)$", k) or re.match(r"^(.*?layer\.)(\d+)(\..*)$", k)
        if m:
            groups.setdefault(m.group(1) + "{}" + m.group(3), []).append(int(m.group(2)))
        else:
            groups.setdefault(k, [])
    parts = []
    for pattern, idx in sorted(groups.items()):
        if not idx:
            parts.append(pattern)
            continue
        idx = sorted(set(idx))
        span = str(idx[0]) if len(idx) == 1 else (
            f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ",".join(map(str, idx))
        )
        parts.append(pattern.replace("{}", "{" + span + "}"))
    if len(parts) > limit:
        return ", ".join(parts[:limit]) + f", ... ({len(parts) - limit} more)"
    return ", ".join(parts)


def tensor_dtypes(sd: Mapping[str, Tensor]) -> list[str]:
    return sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})


def training_state_sides(obj: Any, path: Path) -> dict[str, dict[str, Tensor]]:
    """{"student": sd, "teacher": sd} of a self-distillation training checkpoint, keys below the side kept
    (`backbone.*`, `dino_head.*`, `ibot_head.*`) with FSDP block chunks and `module.` wrappers removed. Reads our
    training checkpoints and the original's `model_checkpoint.pth` ({"model": {student.*, teacher.*}}), and
    `teacher_checkpoint.pth` ({"teacher": ...}), whose teacher is then the student too."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        sd = dict(obj["model"])
    elif isinstance(obj, Mapping) and isinstance(obj.get("teacher"), Mapping):
        sd = {f"teacher.{k}": v for k, v in obj["teacher"].items()}
    else:
        top = sorted(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(path, f"unknown checkpoint layout (top-level keys {top})")
    out: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}}
    for k, v in sd.items():
        k = ".".join(part for part in str(k).split(".") if part != "module")
        side, _, rest = k.partition(".")
        if side in out and rest:
            out[side][rest] = v
    for side, tensors in out.items():
        backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        flat, _ = unchunk_blocks(backbone, path)
        out[side] = {**{k: v for k, v in tensors.items() if not k.startswith("backbone.")},
                     **{f"backbone.{k}": v for k, v in flat.items()}}
    if not out["student"]:
        out["student"] = dict(out["teacher"])
    if not out["teacher"]:
        raise CheckpointError(path, "no teacher/student weights found")
    return out
