"""Localisation scores for attention heatmaps against expert boxes.

All geometry lives in the *model input* frame: the S x S image that `InputTransform.geometry` produces
(resize shorter side to S then centre-crop, or resize longer side then pad). Boxes given in pixels of the
source image are mapped through the same resize/crop/pad; parts cut off by the crop are clipped.

Scores per (image, finding) with at least one box:
- pointing game (Zhang et al. 2016): hit when the heatmap's maximum lies inside a box of that finding
  (optionally within `tolerance` pixels of one);
- attention mass: share of the (non-negative) heatmap inside the union of the finding's boxes.
Baselines on the same items: a centre prior (an isotropic Gaussian at the image centre; its pointing hit is
"does a box contain the centre") and the uniform map (mass = box area fraction; pointing is undefined).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from chexfound.errors import ManifestError


# --- boxes ------------------------------------------------------------------------------------------------

def read_boxes(path: str | PathLike[str], rename: dict[str, str] | None = None) -> pd.DataFrame:
    """Box CSV with columns image_id, finding, x, y, w, h (pixels of the source image; NIH BBox_List style).

    Also accepts NIH's original headers (`Image Index`, `Finding Label`, `Bbox [x`, `y`, `w`, `h]`) and
    x_min/y_min/x_max/y_max (VinDr style). `rename` maps box finding names to label names
    (e.g. {"Infiltrate": "Infiltration"}).
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(p, "box file not found")
    df = pd.read_csv(p)
    df = df.rename(columns={"Image Index": "image_id", "Finding Label": "finding", "Bbox [x": "x", "h]": "h",
                            "class_name": "finding"})
    if {"x_min", "y_min", "x_max", "y_max"} <= set(df.columns):
        df = df.assign(x=df["x_min"], y=df["y_min"], w=df["x_max"] - df["x_min"], h=df["y_max"] - df["y_min"])
    need = ["image_id", "finding", "x", "y", "w", "h"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ManifestError(p, f"box file lacks column(s) {missing}; columns: {list(df.columns)}")
    df = df.dropna(subset=["x", "y", "w", "h"])[need].copy()
    df["image_id"] = df["image_id"].astype(str)
    df["finding"] = df["finding"].astype(str).str.strip()
    if rename:
        df["finding"] = df["finding"].replace(rename)
    bad = df[(df["w"] <= 0) | (df["h"] <= 0)]
    if len(bad):
        raise ManifestError(p, f"{len(bad)} box(es) with non-positive width/height, e.g. row {bad.index[0]}")
    return df.reset_index(drop=True)


def map_boxes(boxes_xywh: np.ndarray, src_hw: tuple[int, int], size: int, mode: str = "crop") -> np.ndarray:
    """Boxes (x, y, w, h) in source pixels -> (x0, y0, x1, y1) in the S x S model-input frame (clipped).

    Mirrors `InputTransform.geometry`: scale so the shorter (crop) / longer (pad) side is `size`, rounding
    the resized shape the same way, then shift by the crop/pad offset.
    """
    b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    h, w = src_hw
    scale = size / (min(h, w) if mode == "crop" else max(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    sy, sx = nh / h, nw / w
    if mode == "crop":
        oy, ox = -((nh - size) // 2), -((nw - size) // 2)
    elif mode == "pad":
        oy, ox = (size - nh) // 2, (size - nw) // 2
    else:
        raise ValueError(f"unknown transform mode {mode!r}")
    x0 = b[:, 0] * sx + ox
    y0 = b[:, 1] * sy + oy
    x1 = (b[:, 0] + b[:, 2]) * sx + ox
    y1 = (b[:, 1] + b[:, 3]) * sy + oy
    out = np.stack([x0, y0, x1, y1], axis=1)
    return np.clip(out, 0, size)


def box_mask(boxes_xyxy: np.ndarray, size: int) -> np.ndarray:
    """Union of boxes as a bool [S, S] mask; a pixel is inside when its centre is."""
    m = np.zeros((size, size), dtype=bool)
    c = np.arange(size) + 0.5
    for x0, y0, x1, y1 in np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4):
        rows = (c >= y0) & (c <= y1)
        cols = (c >= x0) & (c <= x1)
        m |= rows[:, None] & cols[None, :]
    return m


# --- baselines ---------------------------------------------------------------------------------------------

def centre_prior(size: int, sigma_frac: float = 0.25) -> np.ndarray:
    """Isotropic Gaussian centred on the image; sigma = sigma_frac * size."""
    c = np.arange(size) + 0.5 - size / 2
    g = np.exp(-(c**2) / (2 * (sigma_frac * size) ** 2))
    return np.outer(g, g)


# --- scores -----------------------------------------------------------------------------------------------

def peak(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) pixel centre of the maximum (first in row-major order on ties)."""
    i = int(np.argmax(heatmap))
    r, c = divmod(i, heatmap.shape[1])
    return c + 0.5, r + 0.5


def pointing_hit(heatmap: np.ndarray, boxes_xyxy: np.ndarray, tolerance: float = 0.0) -> bool:
    x, y = peak(heatmap)
    for x0, y0, x1, y1 in np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4):
        dx = max(x0 - x, 0.0, x - x1)
        dy = max(y0 - y, 0.0, y - y1)
        if dx * dx + dy * dy <= tolerance * tolerance:
            return True
    return False


def mass_in_boxes(heatmap: np.ndarray, mask: np.ndarray) -> float:
    h = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    tot = h.sum()
    return float(h[mask].sum() / tot) if tot > 0 else float("nan")


@dataclass
class LocalisationItem:
    """One (image, finding) with its heatmap and boxes, both in the model-input frame."""

    image_id: str
    patient_id: str
    finding: str
    heatmap: np.ndarray
    boxes: np.ndarray  # [K, 4] x0 y0 x1 y1
    extra: dict[str, Any] = field(default_factory=dict)


def score_items(items: Sequence[LocalisationItem], tolerance: float = 0.0,
                sigma_frac: float = 0.25) -> pd.DataFrame:
    """One row per item: model and baseline pointing hits and masses, box area fraction."""
    rows = []
    prior_cache: dict[int, np.ndarray] = {}
    for it in items:
        s = it.heatmap.shape[0]
        prior = prior_cache.setdefault(s, centre_prior(s, sigma_frac))
        mask = box_mask(it.boxes, s)
        rows.append({
            "image_id": it.image_id, "patient_id": it.patient_id, "finding": it.finding,
            "n_boxes": len(it.boxes),
            "pointing": float(pointing_hit(it.heatmap, it.boxes, tolerance)),
            "mass": mass_in_boxes(it.heatmap, mask),
            "centre_pointing": float(pointing_hit(prior, it.boxes, tolerance)),
            "centre_mass": mass_in_boxes(prior, mask),
            "uniform_mass": float(mask.mean()),
        })
    return pd.DataFrame(rows, columns=["image_id", "patient_id", "finding", "n_boxes", "pointing", "mass",
                                       "centre_pointing", "centre_mass", "uniform_mass"])


_SCORE_COLS = ("pointing", "mass", "centre_pointing", "centre_mass", "uniform_mass")


def summarise(scores: pd.DataFrame, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Means per finding and overall, with patient-level percentile CIs (resampling patients)."""
    from chexfound.stats.resample import BootstrapConfig, percentile_ci, resample_weights

    def block(df: pd.DataFrame) -> dict[str, Any]:
        out: dict[str, Any] = {"n_items": int(len(df)), "n_patients": int(df["patient_id"].nunique())}
        if not len(df):
            return out
        vals = df[list(_SCORE_COLS)].to_numpy(dtype=np.float64)
        for j, k in enumerate(_SCORE_COLS):
            out[k] = float(np.nanmean(vals[:, j]))
        draws = []
        for w in resample_weights(df["patient_id"].to_numpy(), len(df), BootstrapConfig(n_boot=n_boot, seed=seed)):
            with np.errstate(invalid="ignore", divide="ignore"):
                good = ~np.isnan(vals)
                num = w @ np.where(good, vals, 0.0)
                den = w @ good.astype(np.float64)
                draws.append(num / den)
        d = np.concatenate(draws)
        for j, k in enumerate(_SCORE_COLS):
            out[f"{k}_ci"] = list(percentile_ci(d[:, j], ci))
        return out

    per = {f: block(g) for f, g in scores.groupby("finding", sort=True)}
    return {"overall": block(scores), "per_finding": per}
