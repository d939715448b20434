"""Does an image, as displayed, look like a chest X-ray the right way round (air dark, bone bright)?

The check behind the MONOCHROME1 warning: a MONOCHROME1 header means "minimum = white", and the reader inverts
such pixels (as the standard says). Some files carry that header over pixels stored the other way round; read
as the header says, they come out as a negative. In a frontal CXR displayed correctly the mediastinum (a
central vertical strip, 45-55 % of the width, 30-70 % of the height) is brighter than the lung fields beside
it (20-35 % and 65-80 % of the width); `INVERTED_CONTRAST` (-0.05) is how much darker than the lungs, on the
[0, 1] display scale, the strip must be for the image to look inverted. On the shared data this separates the
one such file (-0.33) from every correct one (+0.08 to +0.44). A heuristic: it only warns, it never changes
how a file is read.
"""

from __future__ import annotations

import numpy as np

INVERTED_CONTRAST = -0.05


def mediastinum_contrast(pixels: np.ndarray) -> float:
    """Mean of the central strip minus mean of the two lung strips, on a displayed image in [0, 1]."""
    h, w = pixels.shape[:2]
    if h < 10 or w < 10:
        return float("nan")
    rows = slice(int(0.3 * h), max(int(0.7 * h), int(0.3 * h) + 1))
    mid = pixels[rows, int(0.45 * w): max(int(0.55 * w), int(0.45 * w) + 1)]
    left = pixels[rows, int(0.2 * w): max(int(0.35 * w), int(0.2 * w) + 1)]
    right = pixels[rows, int(0.65 * w): max(int(0.8 * w), int(0.65 * w) + 1)]
    lungs = (float(left.mean()) * left.size + float(right.mean()) * right.size) / (left.size + right.size)
    return float(mid.mean()) - lungs


def looks_inverted(pixels: np.ndarray) -> bool:
    """True when the displayed image looks like a negative (mediastinum darker than the lungs)."""
    c = mediastinum_contrast(pixels)
    return bool(np.isfinite(c) and c < INVERTED_CONTRAST)
