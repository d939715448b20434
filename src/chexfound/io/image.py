"""The in-memory chest X-ray every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np

from chexfound.io.failures import ImageReadError, ReadFailure

# Smallest side we accept by default: one 16-px patch of the CheXFound ViT. Anything smaller is not a
# radiograph (icons, thumbnails, corrupt headers); callers that need more pass their own `min_size`.
MIN_SIZE = 16

# Refuse to allocate more than this many pixels for one image (a corrupt header can claim 2^32).
# The largest real CXR detectors are ~4300 x 4300; 2^28 leaves ample room.
MAX_PIXELS = 1 << 28


@dataclass
class CXRImage:
    """A grayscale radiograph as displayed.

    pixels: float32 array [rows, columns] in [0, 1]; 0 is black (air in the lungs is dark), as a
        radiologist views the image after rescale, VOI LUT and MONOCHROME1 inversion.
    meta: what the file said: ``source_format``, ``original_size`` (rows, cols), ``bit_depth``,
        ``photometric_interpretation``, ``pixel_spacing`` ((row, col) mm or None), ``view_position``,
        ``patient_id``, ``study_id`` where known, and ``path``. Values are JSON-serialisable.
    """

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the pixel array."""
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))

    def to_uint8(self) -> np.ndarray:
        """The image as displayed, 8-bit (0..255, rounded): for previews and PNG exports."""
        return np.clip(np.rint(self.pixels * 255.0), 0, 255).astype(np.uint8)


def check_min_size(shape: tuple[int, ...], min_size: int | None, path: str | PathLike[str] | None) -> None:
    """Raise ImageReadError (too small) when the shorter side is below `min_size` (None or 0 disables the check)."""
    if min_size and min(int(shape[0]), int(shape[1])) < min_size:
        raise ImageReadError(
            path, ReadFailure.TOO_SMALL, f"image is {shape[0]}x{shape[1]} px, smaller than the minimum {min_size} px (one model patch)"
        )


_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def normalise_range(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map [lo, hi] (default: the data's own min..max) linearly to [0, 1] as float32. A constant image -> 0."""
    if arr.dtype == np.uint8 and lo == 0 and hi == 255:
        return _UINT8_TO_UNIT[arr]  # the common 8-bit case: a table lookup, no float passes
    a = arr.astype(np.float32, copy=False)
    lo = float(a.min()) if lo is None else float(lo)
    hi = float(a.max()) if hi is None else float(hi)
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.float32)
    out = (a - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    # Float rounding can step a hair outside [0, 1]; values outside [lo, hi] are not expected here.
    return np.clip(out, 0.0, 1.0, out=out)
