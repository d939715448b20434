"""Seeded fuzzing: random byte corruptions and truncations of the real files raise CXRReadError or
decode to a valid image; no other exception (and no crash) escapes the reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chexfound.errors import CXRReadError
from chexfound.io import CXRImage, read_image_bytes


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
    for path, count in _files(data_root):
        original = path.read_bytes()
        for i in range(count):
            data, how = _mutate(original, rng)
            try:
                img = read_image_bytes(data, f"{path.name}#{i}")
            except CXRReadError as e:
                assert e.path == f"{path.name}#{i}" and e.reason, how
                outcomes["error"] += 1
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
