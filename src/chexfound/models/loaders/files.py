"""Reading checkpoint files safely: `torch.load(weights_only=True)` and safetensors, after `filekind.sniff`.

Every failure becomes a CheckpointError that names the file and says what it is (truncated, an image,
a pickled Python object, ...), never a raw pickle/zip traceback.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from chexfound.errors import CheckpointError
from chexfound.models.filekind import describe_kind, sniff, sniff_as, suffix_mismatch

__all__ = ["describe_kind", "load_weights_only", "read_json", "read_safetensors", "read_safetensors_meta", "sniff",
           "sniff_as", "suffix_mismatch"]


def load_weights_only(path: str | PathLike[str]) -> Any:
    """`torch.load(weights_only=True)` with errors that say what went wrong."""
    p, kind = sniff_as(path, ("torch-zip", "torch-legacy"), "a PyTorch checkpoint")
    try:
        if p.name.endswith(".safetensors"):
            # torch.load reads any *path* ending in .safetensors as safetensors, whatever its bytes: hand it the
            # open file instead (no mmap then), so the bytes decide.
            with open(p, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        try:
            # mmap keeps a 1+ GB teacher checkpoint out of RAM until the tensors are copied into the model.
            return torch.load(p, map_location="cpu", weights_only=True, mmap=kind == "torch-zip")
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            p,
            "contains pickled Python objects beyond tensors and plain containers (a whole model, optimizer "
            "object or custom class?); only weights-only loading (torch.load(weights_only=True)) is allowed. "
            "Save model.state_dict() instead. "
            f"({first})",
        ) from e
    except (EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(p, f"truncated or corrupt PyTorch checkpoint ({type(e).__name__}: {e})") from e
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        if "central directory" in msg or "PytorchStreamReader" in msg or "unexpected EOF" in msg.lower():
            raise CheckpointError(p, f"truncated or corrupt PyTorch checkpoint ({msg})") from e
        raise CheckpointError(p, f"could not read PyTorch checkpoint ({msg})") from e


def read_safetensors(path: str | PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the raw string metadata of a safetensors file."""
    p, _ = sniff_as(path, ("safetensors",), "a safetensors file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for truncated/corrupt headers
        raise CheckpointError(p, f"truncated or corrupt safetensors file ({e})") from e
    return tensors, meta


def read_safetensors_meta(path: str | PathLike[str]) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata only (cheap: reads the header)."""
    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(p, f"truncated or corrupt safetensors file ({e})") from e


def read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"could not read JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(path, "expected a JSON object")
    return d
