"""The in-memory chest X-ray every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CXRImage:
    """A grayscale radiograph as displayed.

    pixels: float32 array [rows, columns] in [0, 1]; 0 is black (air in the lungs is dark), as a
        radiologist views the image after rescale, VOI LUT and MONOCHROME1 inversion.
    meta: what the file said: ``source_format``, ``original_size`` (rows, cols), ``bit_depth``,
        ``photometric_interpretation``, ``pixel_spacing``, ``view_position``, ``patient_id``,
        ``study_id`` where known, and ``path``.
    """

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))

    def to_uint8(self) -> np.ndarray:
        return np.clip(np.rint(self.pixels * 255.0), 0, 255).astype(np.uint8)
