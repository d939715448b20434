"""What a file is, from its bytes: a torch checkpoint (zip or legacy pickle), safetensors, an image, ...

Every loader asks this before reading, so a file's name never decides how it is read and a wrong file gets
an error that says what it really is.
"""

from __future__ import annotations

import struct
import zipfile
from os import PathLike
from pathlib import Path

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
    # safetensors first: its 8-byte header length can itself start with a pickle's b"\x80\x02" (640 bytes).
    if len(head) >= 10:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n < 100_000_000:
            return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in (2, 3, 4, 5):
        return "torch-legacy"  # a raw pickle stream (torch.save with _use_new_zipfile_serialization=False)
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "a JSON text file"
    if _looks_like_text(head):
        return "a text file (YAML/CSV/...?)"
    return "an unrecognised binary file"


def _looks_like_text(head: bytes) -> bool:
    """UTF-8 that is mostly printable (random bytes are neither, whatever their length)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:  # a multi-byte character cut at the end of the sniffed head is still text
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    if not text:
        return False
    printable = sum(c.isprintable() or c in "\t\r\n" for c in text)
    return printable / len(text) >= 0.95


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


_KIND_TEXT = {
    "torch-zip": "a PyTorch checkpoint (torch.save zip archive)",
    "torch-legacy": "a PyTorch checkpoint (legacy torch.save pickle stream)",
    "safetensors": "a safetensors file",
    "npz": "a NumPy .npz archive",
    "empty": "an empty file",
}
# What each kind is usually named; a different suffix is worth a note (the bytes decide how it is read).
_SUFFIXES = {"torch-zip": (".pth", ".pt", ".bin", ".ckpt", ".tar"), "torch-legacy": (".pth", ".pt", ".bin", ".ckpt"),
             "safetensors": (".safetensors",), "npz": (".npz",)}


def describe_kind(kind: str) -> str:
    """`sniff`'s answer as words for messages ('a PyTorch checkpoint (torch.save zip archive)')."""
    return _KIND_TEXT.get(kind, kind)


def suffix_mismatch(path: Path, kind: str) -> str | None:
    """A note when the file's name says another kind than its bytes (e.g. a torch checkpoint named
    *.safetensors), or None."""
    usual = _SUFFIXES.get(kind)
    suffix = path.suffix.lower()
    if usual is None or suffix in usual or not suffix:
        return None
    named = next((k for k, v in _SUFFIXES.items() if suffix in v), None)
    if named is None:
        return None
    return f"{path.name} is named like {describe_kind(named)} but is {describe_kind(kind)}; read as what it is"


def sniff_as(path: str | PathLike[str], kinds: tuple[str, ...], what: str) -> tuple[Path, str]:
    """The file's kind, or a CheckpointError saying it is missing, empty or something else than `what`."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "file not found" if not p.exists() else "not a file")
    kind = sniff(p)
    if kind == "empty":
        raise CheckpointError(p, "file is empty")
    if kind not in kinds:
        raise CheckpointError(p, f"this is {describe_kind(kind)}, not {what}")
    return p, kind
