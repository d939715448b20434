"""Our model file format: safetensors tensors + one JSON metadata entry.

metadata["chexfound"] = {"format_version": 1, "kind": "backbone" | "head" | ...,
                         "config": {...}, "project_version": "...", ...}
Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chexfound import __version__
from chexfound.errors import CheckpointError
from chexfound.runio import atomic_output

FORMAT_VERSION = 1
META_KEY = "chexfound"


def save_tensors(path: str | PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Write tensors + metadata atomically; returns the file's SHA-256."""
    p = Path(path)
    meta = {"format_version": FORMAT_VERSION, "project_version": __version__, **meta}
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_output(p) as tmp:
        save_file(clean, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return sha256_file(p)


def read_meta(path: str | PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:
        raise CheckpointError(p, f"not a readable safetensors file ({e})") from e
    if raw is None:
        raise CheckpointError(p, "safetensors file has no chexfound metadata (not written by chexfound)")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(p, f"corrupt chexfound metadata ({e})") from e


def load_tensors(path: str | PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    p = Path(path)
    meta = read_meta(p)
    try:
        with safe_open(str(p), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(p, f"could not read tensors ({e})") from e
    return tensors, meta


def sha256_file(path: str | PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """Identity of a set of weights independent of file layout (used to tie heads to backbones)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
