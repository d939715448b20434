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
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from chexfound.errors import CXRReadError
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


def _open(data: bytes, path: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombWarning as e:
        raise CXRReadError(path, f"image too large ({e})") from e
    except Exception as e:
        raise CXRReadError(path, f"not a readable image ({type(e).__name__}: {e})") from e


def decode_raster(data: bytes, path: str, *, color: str = "error", im: Image.Image | None = None) -> CXRImage:
    """Decode a Pillow-readable image. Raises CXRReadError for corrupt/truncated/colour/animated files."""
    im = im if im is not None else _open(data, path)
    try:
        return _decode(im, path, color)
    except CXRReadError:
        raise
    except MemoryError as e:
        raise CXRReadError(path, "image too large to decode") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad data
        raise CXRReadError(path, f"corrupt or truncated image ({type(e).__name__}: {e})") from e
    finally:
        im.close()


def _decode(im: Image.Image, path: str, color: str) -> CXRImage:
    fmt = im.format or "unknown"
    w, h = im.size
    if w <= 0 or h <= 0:
        raise CXRReadError(path, f"image has invalid size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise CXRReadError(path, f"image is {h}x{w} px, beyond the {MAX_PIXELS} pixel limit")
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    if n_frames > 1:
        raise CXRReadError(path, f"multi-frame {fmt} ({n_frames} frames); a radiograph has one frame")
    # Never silently decode a truncated file as grey padding (another library may have flipped this).
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    mode_in = im.mode
    im.load()
    im = ImageOps.exif_transpose(im) or im
    meta: dict[str, Any] = {"source_format": fmt, "mode": mode_in, "original_size": [im.size[1], im.size[0]]}

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
            raise CXRReadError(path, "image contains non-finite values")
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
            raise CXRReadError(
                path, f"colour {fmt} image (channels differ); chest X-rays are grayscale "
                "(pass color='luminance' to convert)"
            )
        f = rgb.astype(np.float32)
        # Equal channels: their mean is the grey level (and averages away JPEG chroma noise).
        lum = f.mean(axis=-1) if grey else 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
        pixels = normalise_range(lum, 0, 255)
        meta.update(bit_depth=8, photometric_interpretation="MONOCHROME2" if grey else "RGB",
                    converted_from=mode if grey else f"{mode} (luminance)")
    else:
        raise CXRReadError(path, f"unsupported image mode {mode!r} in {fmt}")
    meta.update(pixel_spacing=None, view_position=None, patient_id=None, study_id=None)
    return CXRImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), meta=meta)
