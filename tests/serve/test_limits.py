"""Hostile uploads: images over the total-pixel limit are refused from their header (PNG IHDR, JPEG SOF,
DICOM Rows/Columns) without decoding, and uploads past the decode slots get 503 while /healthz answers."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from chexfound.serve import Predictor
from chexfound.serve import uploads
from chexfound.serve.app import ServeSettings, create_app
from chexfound.serve.limits import DEFAULT_MAX_IMAGE_PIXELS, WorkGate, size_problem


@pytest.fixture(scope="module")
def predictor(models: dict[str, Path]) -> Predictor:
    return Predictor(models["backbone"], models["linear"], device="cpu")


def png_16bit_header(width: int, height: int) -> bytes:
    """A PNG declaring width x height 16-bit grayscale pixels, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose SOF0 marker is rewritten to declare width x height."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def dicom_declaring(rows: int, cols: int) -> bytes:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, 16, 12, 11
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = b"\x00\x00" * 16  # far less than declared: it must never be read
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_size_problem_names_the_limit_and_the_cli_default_is_the_library_default() -> None:
    from chexfound.cli.commands.serve import MAX_IMAGE_PIXELS

    assert MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS == ServeSettings().max_image_pixels
    assert size_problem((4300, 4300), 8192, DEFAULT_MAX_IMAGE_PIXELS) is None  # the largest real CXR passes
    msg = size_problem((8000, 8000), 8192, DEFAULT_MAX_IMAGE_PIXELS)
    assert msg is not None and "8000x8000" in msg and "25,000,000 pixels" in msg
    assert "per side" in str(size_problem((9000, 100), 8192, DEFAULT_MAX_IMAGE_PIXELS))


@pytest.mark.parametrize("name, content", [
    ("bomb.png", png_16bit_header(8000, 8000)),   # within 8192 per side, 64 M pixels
    ("bomb.jpg", jpeg_declaring(6000, 6000)),
    ("bomb.dcm", dicom_declaring(6000, 6000)),
])
def test_oversized_images_get_413_from_their_header_without_decoding(
        predictor: Predictor, monkeypatch: pytest.MonkeyPatch, name: str, content: bytes) -> None:
    def no_decode(*a, **k):  # the refusal must come from the header alone
        raise AssertionError("the decoder ran on an oversized upload")

    monkeypatch.setattr(uploads, "read_image_bytes", no_decode)
    with TestClient(create_app(predictor, ServeSettings(max_wait_ms=1))) as c:
        r = c.post("/v1/predict", files={"file": (name, content)})
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["kind"] == "too_large" and name in body["detail"] and "25,000,000 pixels" in body["detail"]


def test_the_pixel_limit_is_configurable(predictor: Predictor, small_png: Path) -> None:
    with TestClient(create_app(predictor, ServeSettings(max_image_pixels=512 * 512 - 1))) as c:
        r = c.post("/v1/predict", files={"file": ("x.png", small_png.read_bytes())})  # 512 x 512
        assert r.status_code == 413 and "262,143 pixels" in r.json()["detail"]
        assert c.get("/v1/model").json()["limits"]["max_image_pixels"] == 512 * 512 - 1


def test_uploads_past_the_decode_slots_get_503_and_health_still_answers(predictor: Predictor,
                                                                        small_png: Path) -> None:
    settings = ServeSettings(max_wait_ms=1, decode_workers=1, busy_wait_s=0.05)
    with TestClient(create_app(predictor, settings)) as c:
        gate: WorkGate = c.app.state.serve.work_gate
        assert gate.try_enter()  # another upload holds the only slot
        try:
            r = c.post("/v1/predict", files={"file": ("x.png", small_png.read_bytes())})
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
            h = c.get("/healthz")
            assert h.status_code == 200 and h.json()["decoding"] == {"capacity": 1, "held": 1, "refused": 1}
        finally:
            gate.leave()
        assert c.post("/v1/predict", files={"file": ("x.png", small_png.read_bytes())}).status_code == 200
        assert gate.held == 0  # the slot is given back after a prediction


def test_a_waiting_upload_gets_the_slot_when_it_frees() -> None:
    import asyncio

    gate = WorkGate(1, wait_s=5.0)

    async def scenario() -> float:
        assert gate.try_enter()
        asyncio.get_running_loop().call_later(0.05, gate.leave)
        t0 = asyncio.get_running_loop().time()
        await gate.enter()  # queued, then admitted
        return asyncio.get_running_loop().time() - t0

    waited = asyncio.run(scenario())
    assert 0.03 < waited < 5.0 and gate.held == 1 and gate.refused == 0
