"""DICOM VOI transforms (PS3.3 C.11.2): window centre/width (LINEAR, LINEAR_EXACT, SIGMOID) and VOI LUTs.

Each maps modality values to display values in [0, 1] (0 = darkest), before any MONOCHROME1 inversion.
We implement the formulas ourselves rather than call pydicom's `apply_voi_lut` so the output range is
exactly [0, 1] independent of BitsStored bookkeeping.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _first(value: Any) -> float | None:
    """WindowCenter/WindowWidth may be multi-valued (several presets): the first is the default."""
    if value is None:
        return None
    try:
        if hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
            if len(value) == 0:
                return None
            value = value[0]
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def window_params(ds: Any) -> tuple[float, float, str] | None:
    """(centre, width, function) from the dataset, or None when absent or unusable (width < 1)."""
    c = _first(ds.get("WindowCenter"))
    w = _first(ds.get("WindowWidth"))
    if c is None or w is None:
        return None
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        func = "LINEAR"
    if func == "LINEAR" and w < 1:
        return None  # the standard requires width >= 1 for LINEAR
    if w <= 0:
        return None
    return c, w, func


def apply_window(x: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Window modality values `x` to [0, 1] float32 following PS3.3 C.11.2.1.2."""
    x = x.astype(np.float64, copy=False)
    if function == "LINEAR_EXACT":
        y = (x - centre) / width + 0.5
    elif function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / width))
    else:  # LINEAR: the classic formula with its half-pixel offsets
        y = (x - (centre - 0.5)) / (width - 1.0) + 0.5 if width > 1 else (x > centre - 0.5).astype(np.float64)
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def apply_voi_lut_item(x: np.ndarray, item: Any) -> np.ndarray:
    """Apply one VOI LUT Sequence item to integer modality values -> [0, 1] float32.

    LUT Descriptor = (entries (0 means 65536), first mapped value, bits per entry). Values below the first
    mapped value take the first entry, above the last take the last entry (PS3.3 C.11.2.1.1).
    """
    desc = [int(v) for v in item.LUTDescriptor]
    n_entries = desc[0] or 65536
    first = desc[1]
    bits = desc[2]
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        lut = np.frombuffer(raw, dtype="<u2" if bits > 8 or len(raw) >= 2 * n_entries else "u1")
    else:
        lut = np.asarray(raw if hasattr(raw, "__len__") else [raw])
    lut = lut.astype(np.float64)[:n_entries]
    if lut.size == 0:
        raise ValueError("VOI LUT has no data")
    # Some writers declare 16 bits but store 8-bit-range data (a known quirk); use the declared depth
    # unless the data exceeds it.
    top = float(max(2 ** bits - 1, lut.max()))
    idx = np.clip(np.rint(x).astype(np.int64) - first, 0, lut.size - 1)
    return (lut[idx] / top).astype(np.float32)
