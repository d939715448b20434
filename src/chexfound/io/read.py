"""`read_image`: any supported file -> CXRImage (pixels float32 [H, W] in [0, 1] as displayed, plus meta).

Format detection is by content, not by extension: the DICOM "DICM" marker at byte 128, then anything
Pillow recognises (PNG, JPEG, TIFF, BMP...), then a forced DICOM read for ACR-NEMA style files that have
neither preamble nor file meta. Every failure is an `ImageReadError` (a CXRReadError) naming the file, the
reason and its `kind` (a `ReadFailure`: truncated, undecodable, not an image, too large...).
"""

from __future__ import annotations

import io
from os import PathLike
from pathlib import Path
from typing import Literal

from chexfound.io.decoder_logs import decoder_messages
from chexfound.io.dicom import decode_dicom, has_dicom_marker, looks_like_acr_nema
from chexfound.io.failures import ImageReadError, ReadFailure
from chexfound.io.image import MIN_SIZE, CXRImage, check_min_size
from chexfound.io.raster import decode_raster, open_raster

ColorPolicy = Literal["error", "luminance"]

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})  # read as DICOM even without the "DICM" preamble


def read_image_bytes(
    data: bytes,
    name: str = "upload",
    *,
    min_size: int | None = MIN_SIZE,
    color: ColorPolicy = "error",
    apply_voi: bool = True,
) -> CXRImage:
    """Decode an in-memory file (e.g. an upload); `name` is used in messages and meta (the server passes
    "upload 'chest.dcm'"). Raises ImageReadError (a CXRReadError) whose `kind` says what went wrong."""
    if not data:
        raise ImageReadError(name, ReadFailure.EMPTY, "empty file")
    if color not in ("error", "luminance"):
        raise ValueError(f"color must be 'error' or 'luminance', not {color!r}")
    if has_dicom_marker(data):
        img = decode_dicom(data, name, apply_voi=apply_voi, color=color)
    else:
        im = open_raster(data, name)
        if im is not None:
            img = decode_raster(data, name, color=color, im=im)
        # a meta-less DICOM is recognised by its first tag, or by its name ("upload 'x.dcm'" counts too)
        elif looks_like_acr_nema(data) or Path(name.rstrip("'")).suffix.lower() in DICOM_SUFFIXES:
            img = decode_dicom(data, name, apply_voi=apply_voi, color=color)
        else:
            raise ImageReadError(name, ReadFailure.NOT_AN_IMAGE, "not a recognised image format (expected DICOM, "
                                                                 "PNG, JPEG, TIFF...): no DICM marker, no DICOM "
                                                                 "elements and no image signature")
    check_min_size(img.shape, min_size, name)
    img.meta["path"] = name
    return img


def declared_size(data: bytes, name: str = "upload") -> tuple[int, int] | None:
    """(rows, cols) from the header alone, before any pixel is decoded (a server checks its limits with this);
    None when the header does not say. Raises ImageReadError (too large) for a Pillow decompression bomb."""
    if not has_dicom_marker(data):
        im = None
        try:
            im = open_raster(data, name)
        except ImageReadError as e:
            if e.kind is ReadFailure.TOO_LARGE:
                raise
        if im is not None:
            with im:
                return int(im.size[1]), int(im.size[0])
    try:
        import pydicom

        with decoder_messages(name):
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        rows, cols = ds.get("Rows"), ds.get("Columns")
        return (int(rows), int(cols)) if rows and cols else None
    except Exception:  # not DICOM either: the full read says what it is
        return None


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
        raise ImageReadError(p, ReadFailure.UNREADABLE_FILE, "no such file")
    if not p.is_file():
        raise ImageReadError(p, ReadFailure.UNREADABLE_FILE, "not a regular file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageReadError(p, ReadFailure.UNREADABLE_FILE, f"cannot read file ({e.strerror or e})") from e
    return read_image_bytes(data, str(p), min_size=min_size, color=color, apply_voi=apply_voi)
