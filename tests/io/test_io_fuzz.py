"""Seeded fuzzing: random byte corruptions and truncations of the real files raise CXRReadError or
decode to a valid image; no other exception (and no crash) escapes the reader. Every error says which
kind of failure it is, and the kinds are right where the cause is known (a cut file is "truncated",
random bytes are "not an image", an oversized header is "too large")."""

from __future__ import annotations

import io
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from chexfound.errors import CXRReadError
from chexfound.io import CXRImage, ImageReadError, ReadFailure, read_image_bytes
from chexfound.io.dicom import pixel_data_extent


def _mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    b = bytearray(data)
    n = len(b)
    kind = int(rng.integers(6))
    if kind == 0:  # flip random bits anywhere
        k = int(rng.integers(1, 17))
        for i in rng.integers(0, n, size=k):
            b[i] ^= 1 << int(rng.integers(8))
        return bytes(b), f"flip {k} bits"
    if kind == 1:  # scramble bytes in the header region, where parsers make decisions
        k = int(rng.integers(1, 9))
        top = min(n, 2048)
        for i in rng.integers(0, top, size=k):
            b[i] = int(rng.integers(256))
        return bytes(b), f"header {k} bytes"
    if kind == 2:  # truncate
        cut = int(rng.integers(0, n))
        return bytes(b[:cut]), f"truncate at {cut}"
    if kind == 3:  # delete a chunk (shifts everything after it)
        i = int(rng.integers(0, n))
        j = min(n, i + int(rng.integers(1, 4096)))
        return bytes(b[:i] + b[j:]), f"delete {i}:{j}"
    if kind == 4:  # insert random bytes
        i = int(rng.integers(0, n))
        ins = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        return bytes(b[:i]) + ins + bytes(b[i:]), f"insert {len(ins)} at {i}"
    i = int(rng.integers(0, n))  # overwrite a run with 0x00 or 0xFF
    j = min(n, i + int(rng.integers(1, 512)))
    fill = 0xFF if rng.random() < 0.5 else 0x00
    b[i:j] = bytes([fill]) * (j - i)
    return bytes(b), f"fill {fill:#x} {i}:{j}"


def _files(data_root: Path) -> list[tuple[Path, int]]:
    """(file, number of mutants): more for small/fast files, a few for the slow JPEG 2000 decoder."""
    d = data_root / "dicom"
    return [
        (d / "CR-MONO1-10-chest.dcm", 120),  # ACR-NEMA, no preamble: forced read
        (next(d.glob("siim_*.dcm")), 120),  # JPEG baseline in DICOM
        (next(d.glob("nih_gcp_*.dcm")), 80),  # implicit VR, 1 MB
        (d / "RG1_J2KI.dcm", 10),  # JPEG 2000
        (sorted((data_root / "nih14" / "images").glob("*.png"))[0], 120),
        (sorted((data_root / "kermany" / "dataset" / "test" / "NORMAL").glob("*.jpeg"))[0], 120),
    ]


@pytest.mark.timeout(120)
def test_corrupted_real_files_only_raise_cxr_read_error(data_root: Path) -> None:
    rng = np.random.default_rng(20250211)
    outcomes = {"ok": 0, "error": 0}
    kinds: Counter[ReadFailure] = Counter()
    for path, count in _files(data_root):
        original = path.read_bytes()
        for i in range(count):
            data, how = _mutate(original, rng)
            try:
                img = read_image_bytes(data, f"{path.name}#{i}")
            except CXRReadError as e:
                assert e.path == f"{path.name}#{i}" and e.reason, how
                _assert_readable_message(e, how)
                outcomes["error"] += 1
                kinds[e.kind] += 1
                continue
            except Exception as e:  # pragma: no cover - this is the failure being tested for
                pytest.fail(f"{path.name} mutant {i} ({how}) raised {type(e).__name__}: {e}")
            assert isinstance(img, CXRImage)
            p = img.pixels
            assert p.dtype == np.float32 and p.ndim == 2, how
            assert np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0, how
            outcomes["ok"] += 1
    # Both outcomes occur: the corruptions are neither all fatal nor all harmless.
    assert outcomes["ok"] > 10 and outcomes["error"] > 10, outcomes
    # The corruptions are told apart, not lumped under one message.
    assert kinds[ReadFailure.TRUNCATED] > 10 and kinds[ReadFailure.UNDECODABLE] > 10, kinds


def _assert_readable_message(e: CXRReadError, how: str) -> None:
    """The error names its kind and says it in one line, without object reprs or memory addresses."""
    assert isinstance(e, ImageReadError) and isinstance(e.kind, ReadFailure), (how, e)
    assert "object at 0x" not in str(e) and "\n" not in str(e), (how, str(e))
    assert "Traceback" not in str(e), how


@pytest.mark.timeout(120)
def test_files_cut_inside_their_pixel_data_say_truncated(data_root: Path) -> None:
    for path, _ in _files(data_root):
        data = path.read_bytes()
        extent = pixel_data_extent(data) if path.suffix == ".dcm" else None
        start = len(data) - extent[1] if extent else 64  # DICOM: where the pixel data begin
        for cut in np.linspace(start + 16, len(data) - 64, 6).astype(int):
            with pytest.raises(ImageReadError) as e:
                read_image_bytes(data[:cut], path.name)
            assert e.value.kind is ReadFailure.TRUNCATED, (path.name, cut, str(e.value))
            assert "truncated" in str(e.value) and "no pixel data" not in str(e.value)


def test_random_bytes_are_not_an_image_whatever_their_name() -> None:
    rng = np.random.default_rng(7)
    for n in (100, 5000):
        for k in range(10):
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            for name in ("blob", "scan.dcm", "upload 'scan.dcm'"):
                with pytest.raises(ImageReadError) as e:
                    read_image_bytes(data, name)
                assert e.value.kind is ReadFailure.NOT_AN_IMAGE, (n, k, name, str(e.value))
                assert "not a recognised image format" in str(e.value) and name in str(e.value)
                assert "no pixel data" not in str(e.value) and "text" not in str(e.value)


def test_oversized_headers_are_too_large_with_their_size(data_root: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(data_root / "dicom" / "RG1_UNCR.dcm")
    ds.Rows, ds.Columns = 60000, 50000
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageReadError) as e:
        read_image_bytes(buf.getvalue(), "huge.dcm")
    assert e.value.kind is ReadFailure.TOO_LARGE and "60000x50000 pixels" in str(e.value)
    assert "corrupt" not in str(e.value)
    ihdr = struct.pack(">IIBBBBB", 30000, 20000, 8, 0, 0, 0, 0)  # width 30000, height 20000
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0")) + _chunk(b"IEND", b"")
    with pytest.raises(ImageReadError) as e:
        read_image_bytes(png, "huge.png")
    assert e.value.kind is ReadFailure.TOO_LARGE and "20000x30000 pixels" in str(e.value)
    assert "corrupt" not in str(e.value) and "object at" not in str(e.value)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
