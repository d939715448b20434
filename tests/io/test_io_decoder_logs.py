"""Third-party decoder output goes through our logging: pydicom's ERROR tracebacks for a plugin that fails
on a damaged JPEG (before another plugin succeeds) and Pillow's DecompressionBombWarning never reach the
terminal raw; they are kept at DEBUG under chexfound.io, naming the file."""

from __future__ import annotations

import logging
import struct
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import pytest

from chexfound.cli.main import main
from chexfound.io import declared_size, read_image_bytes


def _damaged_jpeg_dicom(data_root: Path) -> bytes:
    """The JPEG-baseline DICOM with 400 bytes of its entropy-coded data zeroed: libjpeg fails with an ERROR
    log from pydicom, Pillow's plugin then decodes it."""
    b = bytearray((data_root / "dicom" / "Fake_MONOHR1.dcm").read_bytes())
    b[2000:2400] = bytes(400)
    return bytes(b)


class _Recorder(logging.Handler):
    """What reaches the root logger (pytest's caplog also hooks non-propagating loggers directly, so it
    cannot tell what an application's root handlers would print)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def root_records() -> Iterator[list[logging.LogRecord]]:
    root, rec = logging.getLogger(), _Recorder()
    level = root.level
    root.addHandler(rec)
    root.setLevel(logging.DEBUG)
    try:
        yield rec.records
    finally:
        root.removeHandler(rec)
        root.setLevel(level)


def test_pydicom_errors_are_debug_records_naming_the_file(data_root: Path,
                                                         root_records: list[logging.LogRecord]) -> None:
    img = read_image_bytes(_damaged_jpeg_dicom(data_root), "damaged.dcm")
    assert img.shape == (1024, 1024)
    loud = [r for r in root_records if r.levelno >= logging.WARNING]
    assert not loud, [(r.name, r.getMessage()[:80]) for r in loud]
    said = [r.getMessage() for r in root_records if r.name == "chexfound.io"]
    assert any("damaged.dcm" in m and "libjpeg" in m for m in said), said


def test_pydicom_records_outside_a_decode_reach_the_root_once(root_records: list[logging.LogRecord]) -> None:
    from chexfound.io.decoder_logs import install

    install()
    logging.getLogger("pydicom").warning("a pydicom warning outside any decode")
    logging.getLogger("pydicom.pixels.decoders.base").error("a child logger's error")
    assert [r.getMessage() for r in root_records] == ["a pydicom warning outside any decode", "a child logger's error"]


def test_decompression_bomb_warning_does_not_escape() -> None:
    ihdr = struct.pack(">IIBBBBB", 10000, 10000, 8, 0, 0, 0, 0)  # 1e8 px: over Pillow's warning threshold

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert declared_size(png, "big.png") == (10000, 10000)
    assert not caught, [str(w.message) for w in caught]


def test_info_output_has_no_third_party_traceback(data_root: Path, tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "damaged.dcm"
    p.write_bytes(_damaged_jpeg_dicom(data_root))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes((data_root / "dicom" / "RG1_J2KI.dcm").read_bytes()[:300_000])
    assert main(["info", str(p), str(cut)]) == 0
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "pydicom" not in out + err
    assert "1 of 2 file(s) read" in out and "cut.dcm: truncated pixel data" in out


def test_concurrent_decodes_leave_the_warning_state_alone(data_root: Path,
                                                          root_records: list[logging.LogRecord]) -> None:
    """The server decodes in a thread pool: holding messages back must not swap process-wide warning state
    under another thread (warnings.catch_warnings would), and each thread keeps its own messages."""
    from concurrent.futures import ThreadPoolExecutor

    damaged = _damaged_jpeg_dicom(data_root)
    filters = list(warnings.filters)
    with ThreadPoolExecutor(4) as pool:
        shapes = list(pool.map(lambda k: read_image_bytes(damaged, f"t{k}.dcm").shape, range(8)))
    assert shapes == [(1024, 1024)] * 8
    assert warnings.filters == filters
    assert not [r for r in root_records if r.levelno >= logging.WARNING]
    said = [r.getMessage() for r in root_records if r.name == "chexfound.io"]
    assert all(any(m.startswith(f"t{k}.dcm: ") for m in said) for k in range(8)), said
