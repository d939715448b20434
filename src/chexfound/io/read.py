"""`read_image`: any supported file -> CXRImage. (Basic PIL path; DICOM lands with the io issue.)"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image

from chexfound.errors import CXRReadError
from chexfound.io.image import CXRImage


def read_image(path: str | PathLike[str]) -> CXRImage:
    p = Path(path)
    if not p.is_file():
        raise CXRReadError(p, "no such file")
    try:
        with Image.open(p) as im:
            im.load()
            fmt = im.format
            arr = np.asarray(im.convert("L") if im.mode not in ("I;16", "I", "L") else im)
    except Exception as e:  # PIL raises many types
        raise CXRReadError(p, f"not a readable image ({e})") from e
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    pixels = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return CXRImage(pixels=pixels, meta={"path": str(p), "source_format": fmt, "original_size": arr.shape})
