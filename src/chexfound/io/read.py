"""`read_image`: any supported file -> CXRImage (pixels float32 [H, W] in [0, 1] as displayed, plus meta).

Format detection is by content, not by extension: the DICOM "DICM" marker at byte 128, then anything
Pillow recognises (PNG, JPEG, TIFF, BMP...), then a forced DICOM read for ACR-NEMA style files that have
neither preamble nor file meta. Every failure is a CXRReadError naming the file and the reason.
"""

from __future__ import annotations

import io
from os import PathLike
from pathlib import Path
from typing import Literal

from PIL import Image

from chexfound.errors import CXRReadError
from chexfound.io.dicom import decode_dicom
from chexfound.io.image import MIN_SIZE, CXRImage, check_min_size
from chexfound.io.raster import decode_raster

ColorPolicy = Literal["error", "luminance"]

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}  # read as DICOM even without the "DICM" preamble

# Magic numbers of the raster formats we expect, to name the format when Pillow cannot even open it.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF8", "GIF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


def _signature(data: bytes) -> str | None:
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _looks_like_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _looks_like_acr_nema(data: bytes) -> bool:
    """A meta-less DICOM starts with a group-0008 (or 0002) element tag in either byte order."""
    if len(data) < 8:
        return False
    le = int.from_bytes(data[0:2], "little")
    be = int.from_bytes(data[0:2], "big")
    return le in (0x0002, 0x0008) or be in (0x0002, 0x0008)


def read_image_bytes(
    data: bytes,
    name: str = "<bytes>",
    *,
    min_size: int | None = MIN_SIZE,
    color: ColorPolicy = "error",
    apply_voi: bool = True,
) -> CXRImage:
    """Decode an in-memory file (e.g. an upload); `name` is used in messages and meta."""
    if not data:
        raise CXRReadError(name, "empty file")
    if color not in ("error", "luminance"):
        raise ValueError(f"color must be 'error' or 'luminance', not {color!r}")
    if _looks_like_dicom(data):
        img = decode_dicom(data, name, apply_voi=apply_voi, color=color)
    else:
        im = None
        try:
            im = Image.open(io.BytesIO(data))
        except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError...
            fmt = _signature(data)
            if fmt is not None:
                raise CXRReadError(name, f"corrupt {fmt} file ({type(e).__name__}: {e})") from e
        if im is not None:
            img = decode_raster(data, name, color=color, im=im)
        elif _looks_like_acr_nema(data) or Path(name).suffix.lower() in DICOM_SUFFIXES:
            img = decode_dicom(data, name, apply_voi=apply_voi, color=color)
        else:
            raise CXRReadError(name, "not a recognised image format (expected DICOM, PNG, JPEG, TIFF...)")
    check_min_size(img.shape, min_size, name)
    img.meta["path"] = name
    return img


def read_image(
    path: str | PathLike[str],
    *,
    min_size: int | None = MIN_SIZE,
    color: ColorPolicy = "error",
    apply_voi: bool = True,
) -> CXRImage:
    """Read a chest X-ray file (DICOM, PNG 8/16-bit, JPEG, ...) as displayed.

    min_size: shorter side below this raises CXRReadError (default one 16-px patch; None disables).
    color: "error" (default) refuses real colour images; "luminance" converts them (Rec. 601).
    apply_voi: apply the DICOM window/VOI LUT when the file has one (default, as a viewer would).
    """
    p = Path(path)
    if not p.exists():
        raise CXRReadError(p, "no such file")
    if not p.is_file():
        raise CXRReadError(p, "not a regular file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CXRReadError(p, f"cannot read file ({e.strerror or e})") from e
    return read_image_bytes(data, str(p), min_size=min_size, color=color, apply_voi=apply_voi)
