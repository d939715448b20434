"""Reading checkpoint files safely: sniff what a file is, `torch.load(weights_only=True)`, safetensors.

Every failure becomes a CheckpointError that names the file and says what it is (truncated, an image,
a pickled Python object, ...), never a raw pickle/zip traceback.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from chexfound.errors import CheckpointError

# Magic numbers of files people hand to a model loader by mistake.
_MAGIC: list[tuple[bytes, str]] = [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras/TensorFlow weights?)"),
    (b"GGUF", "a GGUF file (llama.cpp)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"%PDF", "a PDF document"),
]


def sniff(path: Path) -> str:
    """What kind of file this is, from its first bytes: 'torch-zip', 'torch-legacy', 'safetensors', 'npz',
    'empty', or a human description such as 'a PNG image'."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        return "empty"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _sniff_zip(path)
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in (2, 3, 4, 5):
        return "torch-legacy"  # a raw pickle stream (torch.save with _use_new_zipfile_serialization=False)
    if len(head) >= 10:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n < 100_000_000:
            return "safetensors"
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "a JSON text file"
    if b"\x00" not in head:
        return "a text file (YAML/CSV/...?)"
    return "an unrecognised binary file"


def _sniff_zip(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return "torch-zip"  # a zip whose central directory is missing: a truncated torch file, reported on load
    if any(n.endswith("data.pkl") for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return f"a zip archive ({len(names)} members, not a PyTorch checkpoint)"


def _sniff_as(path: str | PathLike[str], kinds: tuple[str, ...], what: str) -> tuple[Path, str]:
    """The file's kind, or a CheckpointError saying it is missing, empty or something else than `what`."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "file not found" if not p.exists() else "not a file")
    kind = sniff(p)
    if kind == "empty":
        raise CheckpointError(p, "file is empty")
    if kind not in kinds:
        raise CheckpointError(p, f"this is {kind}, not {what}")
    return p, kind


def load_weights_only(path: str | PathLike[str]) -> Any:
    """`torch.load(weights_only=True)` with errors that say what went wrong."""
    p, kind = _sniff_as(path, ("torch-zip", "torch-legacy"), "a PyTorch checkpoint")
    try:
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
            f"object or custom class?); only weights_only loading is allowed. Save model.state_dict() instead. "
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
    p, _ = _sniff_as(path, ("safetensors",), "a safetensors file")
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
