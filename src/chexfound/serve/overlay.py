"""Heatmap overlays for predict and serve: the only place this stage turns attention into pictures.

The maps themselves come from `chexfound.adapt.heatmap` (head average, bilinear upsampling, gamma 0.5 as the
original notebook), so adapt, predict and serve draw the same thing:
- files (`chexfound predict --heatmaps`): `adapt.heatmap.save_heatmaps` (titled figures, one per finding);
- the web page and API: a pixel-aligned blend with the same colour map and opacity ramp (`blend`), so the
  page can lay it exactly over the image on a canvas.
Both are drawn on the model's field of view of the image (`transform.geometry`: resized, cropped/padded),
rendered at `display_size_for(transform)` — the same field of view as the model input at any size.
"""

from __future__ import annotations

import dataclasses
import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from chexfound.adapt.heatmap import attention_map, save_heatmaps
from chexfound.data.transform import InputTransform
from chexfound.runio import atomic_write_json

GAMMA = 0.5  # the original notebook's display curve
MAX_ALPHA = 0.6  # as adapt.heatmap.overlay_png
COLORMAP = "jet"  # as adapt.heatmap.overlay_png
DEFAULT_DISPLAY_SIZE = 512
INDEX_FILE = "heatmaps.json"


def display_size_for(transform: InputTransform, minimum: int = DEFAULT_DISPLAY_SIZE) -> int:
    """Render at the model resolution, but never below `minimum` (a 64-px test model stays viewable)."""
    return max(transform.size, minimum)


def display_view(pixels: np.ndarray, transform: InputTransform, size: int | None = None) -> np.ndarray:
    """The model's field of view of a [H, W] image in [0, 1], as float32 [size, size] in [0, 1]."""
    size = size or display_size_for(transform)
    return dataclasses.replace(transform, size=size).geometry(pixels).numpy()


def view_from_input(x: torch.Tensor, transform: InputTransform, size: int | None = None) -> np.ndarray:
    """Recover the model's view from a normalised input [3, S, S] (undo mean/std on one channel), as
    float32 [size, size] in [0, 1] — lets batch jobs draw overlays without decoding the file again."""
    g = (x[0].float() * transform.std[0] + transform.mean[0]).clamp(0.0, 1.0)
    size = size or display_size_for(transform)
    if size != g.shape[-1]:
        g = F.interpolate(g[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return g.clamp(0.0, 1.0).numpy()


def heat(attention: np.ndarray, size: int) -> np.ndarray:
    """One finding's head-averaged attention [gh, gw] -> [size, size] float32 in [0, 1]
    (adapt's map with gamma, then min -> 0 and max -> 1 like matplotlib's default norm)."""
    a = np.asarray(attention, dtype=np.float32)
    m = attention_map(a.reshape(-1), size=size, grid=a.shape, gamma=GAMMA)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]).astype(np.float32)


def blend(gray: np.ndarray, heatmap: np.ndarray, max_alpha: float = MAX_ALPHA, cmap: str = COLORMAP) -> np.ndarray:
    """gray [S, S] in [0, 1] + heatmap [S, S] in [0, 1] -> uint8 RGB [S, S, 3]; opacity ramps with the heat,
    so where a finding draws no attention the image stays plain grayscale."""
    if gray.shape != heatmap.shape:
        raise ValueError(f"image {gray.shape} and heatmap {heatmap.shape} differ in size")
    color = _lut(cmap)[np.clip(np.rint(heatmap * 255), 0, 255).astype(np.intp)]
    alpha = (max_alpha * heatmap)[..., None]
    rgb = gray[..., None] * (1.0 - alpha) + color * alpha
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def overlay(gray: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """Display view [S, S] + one finding's attention [gh, gw] -> uint8 RGB overlay [S, S, 3]."""
    return blend(gray, heat(attention, gray.shape[0]))


def png_bytes(arr: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, 3] (or float in [0, 1]) -> PNG bytes."""
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def overlay_png(gray: np.ndarray, attention: np.ndarray) -> bytes:
    return png_bytes(overlay(gray, attention))


def save_overlay_files(view: np.ndarray, attention: np.ndarray, probabilities: np.ndarray,
                       findings: Sequence[str], which: Sequence[int], out_dir: Path, stem: str,
                       kind: str | None = None) -> dict[str, str]:
    """Titled overlay PNGs for the findings `which` of one image into `out_dir` (the title names the map's
    `kind`), plus an index (`heatmaps.json`: finding -> file name) so later runs know what is there.
    Returns that mapping."""
    c, gh, gw = attention.shape
    tf = InputTransform(size=view.shape[0])  # the view is already the model's field of view: geometry = identity
    paths = save_heatmaps(attention.reshape(1, c, gh * gw), probabilities, findings, view, tf, out_dir, stem,
                          which=list(which), gamma=GAMMA, grid=(gh, gw),
                          note=None if kind is None else kind.replace("_", " "))
    written = {findings[i]: p.name for i, p in zip(which, paths)}
    atomic_write_json(out_dir / INDEX_FILE, written, indent=1)
    return written


def read_overlay_index(out_dir: Path) -> dict[str, str]:
    """finding -> overlay file path, for the files that exist."""
    try:
        names = json.loads((out_dir / INDEX_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: str(out_dir / v) for k, v in names.items() if (out_dir / v).is_file()}
