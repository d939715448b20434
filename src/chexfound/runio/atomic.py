"""Atomic files: a reader sees the old file or the whole new one, never a half-written one.

Every writer goes through a temp file in the destination folder (same file system, so the final rename is
atomic), fsynced before the rename; the folder is fsynced after it where the platform allows, so the rename
itself survives a power cut. The file ends up with the usual permissions (0666 less the umask), not the 0600
that temp files are created with.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any

from chexfound.runio.jsonsafe import json_safe

__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def _default_mode() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder; the rename is then as durable as the OS makes it
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path next to `path` for any writer (torch.save, safetensors, PIL, to_csv, savefig...);
    on success it is renamed to `path`, on an exception it is removed and `path` is left as it was.

    The temp name keeps the final suffix (`.name.XXXX.tmp.png`), so writers that pick a format or a
    compression from the suffix (PIL, matplotlib, pandas, np.save) behave as they would on `path`.
    `fsync=False` skips the flushes to disk (atomic but not durable): for bulk caches whose own index is the
    durable record."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=f".tmp{final.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            _fsync_file(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(final.parent)


def atomic_write_bytes(path: str | PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    final = Path(path)
    with atomic_output(final, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return final


def atomic_write_text(path: str | PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (UTF-8 unless told otherwise); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write `obj` as JSON atomically, made JSON-safe first (NaN/inf -> null, numpy/tensors -> lists...);
    a trailing newline, so the file is a proper text file."""
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False)
    return atomic_write_text(path, text + "\n")
