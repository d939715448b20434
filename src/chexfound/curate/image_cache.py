"""The preprocessing cache: decode each image once, hash it, resize it, store it.

Work runs in chunks, in worker processes (spawned, so nothing of the parent, e.g. torch threads, leaks in).
Each image becomes one record (a dict, one JSON line in DIR/work/records.jsonl, appended by the parent as
chunks finish); a rerun skips every key whose record is present, whose source file is unchanged (size +
mtime) and whose cached output exists, so killed runs resume without redoing finished work.
Corrupt files do not stop anything: their record has status "error" and the reason (the quarantine list).

Layouts under DIR:
- png: cache/<source>/<relative path>.png, one file per image, written atomically (temp + rename).
- tar: shards/shard-<run>-<chunk>.tar of PNG members, each shard written whole then renamed; records carry
  the member's byte offset and length, so a reader can seek straight to an image (see `read_cached`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from chexfound.curate.hashing import exact_hash, phash
from chexfound.curate.keep import grey_bits
from chexfound.errors import ChexfoundError, CXRReadError
from chexfound.io import read_image
from chexfound.runio import atomic_output, atomic_write_bytes

RECORDS = "work/records.jsonl"
QUALITY_FIELDS = ("lossy", "grey_bits")  # what the keep rule (curate.keep) reads from a record


@dataclass(frozen=True)
class CacheConfig:
    size: int = 512
    bit_depth: int = 8
    format: str = "png"
    upscale: bool = False
    phash_bits: int = 256

    def fingerprint(self) -> dict[str, Any]:
        """What the stored outputs depend on; a rerun with a different one cannot reuse them."""
        return asdict(self)


@dataclass(frozen=True)
class WorkItem:
    key: str
    path: str  # source file
    target: str  # png: cache file relative to the out dir; tar: member name


def target_size(h: int, w: int, size: int, upscale: bool) -> tuple[int, int]:
    """Shorter side to `size`, aspect preserved; smaller images are kept as they are unless `upscale`."""
    scale = size / min(h, w)
    if scale >= 1 and not upscale:
        return h, w
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_pixels(pixels: np.ndarray, size: int, upscale: bool = False) -> np.ndarray:
    h, w = pixels.shape
    nh, nw = target_size(h, w, size, upscale)
    if (nh, nw) == (h, w):
        return pixels
    im = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    out = np.asarray(im.resize((nw, nh), Image.Resampling.LANCZOS), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)  # Lanczos overshoots at edges


def encode_png(pixels: np.ndarray, bit_depth: int) -> bytes:
    if bit_depth == 16:
        arr = np.rint(np.clip(pixels, 0, 1) * 65535.0).astype(np.uint16)
    else:
        arr = np.rint(np.clip(pixels, 0, 1) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=4)  # ~2x faster than 6, a few % larger
    return buf.getvalue()


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def process_image(item: WorkItem, cfg: CacheConfig) -> tuple[dict[str, Any], bytes | None]:
    """Decode + hash + resize + encode one image. Never raises for a bad file: returns an error record."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"key": item.key, "stamp": _file_stamp(item.path)}
    try:
        img = read_image(item.path)
        px = np.asarray(img.pixels, dtype=np.float32)
        if px.ndim != 2 or min(px.shape) < 1:
            raise CXRReadError(item.path, f"expected a 2-D grayscale image, got shape {px.shape}")
        if not np.isfinite(px).all():
            raise CXRReadError(item.path, "decoded pixels contain NaN/inf")
        small = resize_pixels(px, cfg.size, cfg.upscale)
        data = encode_png(small, cfg.bit_depth)
        meta = img.meta or {}
        rec.update(
            status="ok",
            orig_height=int(px.shape[0]), orig_width=int(px.shape[1]),
            height=int(small.shape[0]), width=int(small.shape[1]),
            blank=bool(float(px.max()) - float(px.min()) <= 0.0),
            exact=exact_hash(px), phash=phash(px, cfg.phash_bits),
            source_format=meta.get("source_format"), bit_depth_src=meta.get("bit_depth"),
            lossy=meta.get("lossy"), grey_bits=grey_bits(px),
            view_position=meta.get("view_position"), modality=meta.get("modality"),
            patient_age=meta.get("patient_age"),
        )
    except (ChexfoundError, OSError, ValueError, MemoryError) as e:
        rec.update(status="error", reason=str(e))
        data = None
    except Exception as e:  # a decoder bug on one file must not stop a million-image job
        rec.update(status="error", reason=f"{type(e).__name__}: {e}")
        data = None
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    return rec, data


def process_chunk(items: list[WorkItem], cfg: CacheConfig, out_dir: str, shard: str | None) -> list[dict[str, Any]]:
    """Process a chunk in a worker. png: one file per image. tar: the whole chunk becomes `shard`."""
    out = Path(out_dir)
    records = []
    if cfg.format == "png":
        for it in items:
            rec, data = process_image(it, cfg)
            if data is not None:
                # not fsynced per image (a million small syncs): the records log, fsynced per chunk, is what
                # a resumed run trusts, and it re-checks that each output still exists
                atomic_write_bytes(out / it.target, data, fsync=False)
                rec["file"] = it.target
            records.append(rec)
        return records
    assert shard is not None
    with atomic_output(out / shard) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for it in items:
                rec, data = process_image(it, cfg)
                if data is not None:
                    ti = tarfile.TarInfo(it.target)
                    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
                    tar.addfile(ti, io.BytesIO(data))
                    # the member's bytes end the archive so far, padded to 512-byte blocks (long names add
                    # header blocks before them, never after)
                    offset = tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    rec.update(file=shard, member=it.target, offset=offset, length=len(data))
                records.append(rec)
    return records


def read_cached(out_dir: str | PathLike[str], rec: dict[str, Any]) -> bytes:
    """The cached PNG bytes of a record (png file or tar member by offset)."""
    p = Path(out_dir) / rec["file"]
    if rec.get("member"):
        with open(p, "rb") as f:
            f.seek(int(rec["offset"]))
            return f.read(int(rec["length"]))
    return p.read_bytes()


def decode_png(data: bytes) -> np.ndarray:
    """Cached PNG -> float32 [H, W] in [0, 1] (8- or 16-bit)."""
    with Image.open(io.BytesIO(data)) as im:
        sixteen = im.mode.startswith("I")
        arr = np.asarray(im if im.mode in ("L", "I", "I;16", "I;16B") else im.convert("L"))
    return arr.astype(np.float32) / (65535.0 if sixteen else 255.0)


class RecordLog:
    """Append-only JSON-lines log of finished records; a torn last line (killed mid-write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return out
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    out[rec["key"]] = rec
        return out

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        payload = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        with open(self.path, "a+b") as f:
            # a previous run killed mid-line leaves no newline at the end: start on a fresh line
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(payload.encode())
            f.flush()
            os.fsync(f.fileno())


def is_reusable(rec: dict[str, Any] | None, path: str, out_dir: Path, retry_errors: bool) -> bool:
    """A finished record can stand if its source file is unchanged and its output still exists."""
    if rec is None:
        return False
    stamp = _file_stamp(path)
    if rec.get("stamp") is not None and stamp is not None and tuple(rec["stamp"]) != stamp:
        return False
    if rec.get("status") != "ok":
        return not retry_errors and stamp == (tuple(rec["stamp"]) if rec.get("stamp") else None)
    if any(k not in rec for k in QUALITY_FIELDS):
        return False  # recorded before the keep rule needed these: decode it again
    return (out_dir / rec["file"]).is_file()


def chunks(items: list[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    for s in range(0, len(items), size):
        yield items[s:s + size]
