"""PNG / JPEG / TIFF / BMP (anything Pillow decodes) -> CXRImage.

- 8-bit data keep their values (x / 255): they are already display-ready.
- 16-bit (and 32-bit integer / float) data are rescaled by their real min..max, never clipped (Pillow's
  `convert("L")`/`convert("RGB")` clips 16-bit data to 255, which whitens most of a 16-bit CXR).
- RGB/RGBA/palette images are accepted when they hold grayscale (all channels equal up to JPEG chroma
  noise); a real colour image raises CXRReadError unless `color="luminance"` (Rec. 601 luma) is asked for.
- Alpha is ignored (radiographs are opaque); EXIF orientation is applied so pixels are as displayed.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from chexfound.errors import CXRReadError
from chexfound.io.decoder_logs import decoder_messages
from chexfound.io.failures import ImageReadError, ReadFailure
from chexfound.io.image import MAX_PIXELS, CXRImage, normalise_range

# A grayscale image saved as RGB JPEG differs between channels only by chroma rounding (a few levels).
# We call an RGB image grayscale when 99.5% of pixels have a channel spread of at most this many levels.
_GRAY_SPREAD = 12
_GRAY_QUANTILE = 99.5

_INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _is_grayscale(rgb: np.ndarray) -> bool:
    sub = rgb[::2, ::2].astype(np.int16)  # a subsample is plenty and 4x cheaper
    spread = sub.max(axis=-1) - sub.min(axis=-1)
    return float(np.percentile(spread, _GRAY_QUANTILE)) <= _GRAY_SPREAD


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


def raster_signature(data: bytes) -> str | None:
    """The raster format whose magic number `data` starts with, or None."""
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def open_raster(data: bytes, path: str) -> Image.Image | None:
    """Pillow's lazy open (the header only). None when the data are not a raster format we recognise;
    ImageReadError when they start like one but the header is cut off, damaged or declares too many pixels."""
    with decoder_messages(path):  # Pillow's DecompressionBombWarning: our own MAX_PIXELS check decides
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise _too_large_for_pillow(data, path) from e
        except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, struct.error...
            fmt = raster_signature(data)
            if fmt is None:
                return None
            if isinstance(e, (EOFError, struct.error)) or "truncat" in str(e).lower():
                raise ImageReadError(path, ReadFailure.TRUNCATED,
                                     f"truncated {fmt}: the file ends inside its header ({type(e).__name__})") from e
            detail = "" if isinstance(e, UnidentifiedImageError) else f" ({type(e).__name__}: {e})"
            raise ImageReadError(path, ReadFailure.CORRUPT_HEADER,
                                 f"corrupt {fmt} file: its header cannot be parsed{detail}") from e


def _too_large_for_pillow(data: bytes, path: str) -> ImageReadError:
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    size = header_size(data)
    dims = f"{size[1]}x{size[0]} pixels" if size else "the declared size"
    return ImageReadError(path, ReadFailure.TOO_LARGE,
                          f"too large: {dims} is over Pillow's decompression bomb limit of {limit:,} pixels")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the header declares them, read by the format's Pillow plugin directly:
    `Image.open` refuses a decompression bomb before it would tell us its size."""
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is not None and not accept(prefix):
                continue
            with factory(io.BytesIO(data), "") as im:
                return int(im.size[0]), int(im.size[1])
        except Exception:  # not this plugin's format
            continue
    return None


def decode_raster(data: bytes, path: str, *, color: str = "error", im: Image.Image | None = None) -> CXRImage:
    """Decode a Pillow-readable image. Raises ImageReadError for corrupt/truncated/colour/animated files."""
    im = im if im is not None else open_raster(data, path)
    if im is None:
        raise ImageReadError(path, ReadFailure.NOT_AN_IMAGE, "not a recognised image format (Pillow cannot "
                                                             "identify it)")
    fmt = im.format or "image"
    try:
        with decoder_messages(path):
            return _decode(im, path, color)
    except CXRReadError:
        raise
    except MemoryError as e:
        raise ImageReadError(path, ReadFailure.TOO_LARGE, "too large: not enough memory to decode it") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad data
        if isinstance(e, EOFError) or "truncated" in str(e).lower():
            raise ImageReadError(path, ReadFailure.TRUNCATED, f"truncated {fmt}: the file ends before its image "
                                                              f"data do ({type(e).__name__}: {e})") from e
        raise ImageReadError(path, ReadFailure.UNDECODABLE, f"undecodable {fmt} data: the compressed image data "
                                                            f"are damaged ({type(e).__name__}: {e})") from e
    finally:
        im.close()


def _is_lossy(im: Image.Image) -> bool:
    """JPEG-family codestreams discard information; PNG, BMP and (uncompressed/LZW/deflate) TIFF do not."""
    if im.format in ("JPEG", "JPEG2000", "MPO", "WEBP"):
        return not (im.format == "WEBP" and im.info.get("lossless"))
    return im.format == "TIFF" and str(im.info.get("compression", "")).lower() in ("jpeg", "tiff_jpeg", "webp")


def _decode(im: Image.Image, path: str, color: str) -> CXRImage:
    fmt = im.format or "unknown"
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageReadError(path, ReadFailure.INVALID, f"image has invalid size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise ImageReadError(path, ReadFailure.TOO_LARGE,
                             f"too large: {h}x{w} pixels, over the limit of {MAX_PIXELS:,} pixels")
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    if n_frames > 1:
        raise ImageReadError(path, ReadFailure.UNSUPPORTED, f"multi-frame {fmt} ({n_frames} frames); a radiograph has one frame")
    # Never silently decode a truncated file as grey padding (another library may have flipped this).
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    mode_in = im.mode
    im.load()
    im = ImageOps.exif_transpose(im) or im
    meta: dict[str, Any] = {"source_format": fmt, "mode": mode_in, "original_size": [im.size[1], im.size[0]],
                            "lossy": _is_lossy(im)}

    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("LA", "PA", "La"):
        im = im.getchannel(0) if mode != "PA" else im.convert("RGBA")
        mode = im.mode
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        im = im.convert("RGB")
        mode = "RGB"

    if mode == "1":
        pixels = np.asarray(im, dtype=np.float32)
        meta.update(bit_depth=1, photometric_interpretation="MONOCHROME2")
    elif mode == "L":
        pixels = normalise_range(np.asarray(im), 0, 255)
        meta.update(bit_depth=8, photometric_interpretation="MONOCHROME2")
    elif mode in _INT16_MODES or mode in ("I", "F"):
        arr = np.asarray(im)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ImageReadError(path, ReadFailure.INVALID, "image contains non-finite values")
        depth = 16 if (mode in _INT16_MODES or fmt == "PNG") and mode != "F" else 32
        if mode == "I" and arr.size and 0 <= int(arr.min()) and int(arr.max()) <= 65535:
            depth = 16  # Pillow opens some 16-bit files (PNG, TIFF) as 32-bit "I"
        pixels = normalise_range(arr)
        meta.update(bit_depth=depth, photometric_interpretation="MONOCHROME2", value_range=[
            float(arr.min()), float(arr.max())])
    elif mode in ("RGB", "RGBA"):
        rgb = np.asarray(im)[..., :3]
        grey = _is_grayscale(rgb)
        if not grey and color != "luminance":
            raise ImageReadError(
                path, ReadFailure.UNSUPPORTED, f"colour {fmt} image (channels differ); chest X-rays are grayscale "
                "(pass color='luminance' to convert)"
            )
        f = rgb.astype(np.float32)
        # Equal channels: their mean is the grey level (and averages away JPEG chroma noise).
        lum = f.mean(axis=-1) if grey else 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
        pixels = normalise_range(lum, 0, 255)
        meta.update(bit_depth=8, photometric_interpretation="MONOCHROME2" if grey else "RGB",
                    converted_from=mode if grey else f"{mode} (luminance)")
    else:
        raise ImageReadError(path, ReadFailure.UNSUPPORTED, f"unsupported image mode {mode!r} in {fmt}")
    meta.update(pixel_spacing=None, view_position=None, patient_id=None, study_id=None)
    return CXRImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), meta=meta)
