"""Per-finding attention heatmaps from GLoRI: [heads, N_patches] -> averaged over heads -> patch grid ->
bilinear upsampling to the model input -> (optionally) back onto the original image -> overlay PNG.

As the original notebook: bilinear upsampling and a head average; its gamma 0.5 display curve is the
overlay default. `attention_map` returns the map as an array for other stages (pointing game, serving).
"""

from __future__ import annotations

import io
import math
import re
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from chexfound.runio import atomic_write_bytes


def _grid(n: int, grid: Sequence[int] | None) -> tuple[int, int]:
    if grid is not None:
        gh, gw = int(grid[0]), int(grid[1])
        if gh * gw != n:
            raise ValueError(f"{n} attention weights do not fill a {gh}x{gw} grid")
        return gh, gw
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"{n} attention weights are not a square grid; pass grid=(h, w)")
    return s, s


def attention_map(attention: Tensor | np.ndarray, size: int | Sequence[int] | None = None,
                  grid: Sequence[int] | None = None, gamma: float = 1.0, normalize: bool = True) -> np.ndarray:
    """One finding's attention [heads, N] (or [N]) -> float32 map [H, W] at `size` (default: the patch grid).

    Heads are averaged, the grid is upsampled bilinearly, then `gamma` is applied; with `normalize` the map
    is divided by its maximum (so 1 = the most attended location)."""
    a = torch.as_tensor(np.asarray(attention, dtype=np.float32))
    if a.ndim == 2:
        a = a.mean(0)
    if a.ndim != 1:
        raise ValueError(f"expected attention [heads, N] or [N], got shape {tuple(a.shape)}")
    gh, gw = _grid(a.numel(), grid)
    m = a.reshape(1, 1, gh, gw)
    if size is not None:
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        m = F.interpolate(m, size=hw, mode="bilinear", align_corners=False)
    m = m[0, 0].clamp(min=0)
    if gamma != 1.0:
        m = m.pow(gamma)
    if normalize and float(m.max()) > 0:
        m = m / m.max()
    return m.numpy().astype(np.float32)


def to_image_space(heat: np.ndarray, image_hw: Sequence[int], transform: Any) -> np.ndarray:
    """A map over the model input (transform.size squared) -> the original image's pixel grid, undoing the
    transform's resize + centre-crop (outside the crop: 0) or resize + pad."""
    s = int(transform.size)
    if heat.shape != (s, s):
        heat = attention_map(heat.reshape(-1), size=s, grid=heat.shape, normalize=False)
    h, w = int(image_hw[0]), int(image_hw[1])
    scale = s / (min(h, w) if transform.mode == "crop" else max(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    t = torch.as_tensor(heat, dtype=torch.float32)
    if transform.mode == "crop":
        canvas = torch.zeros(nh, nw)
        top, left = (nh - s) // 2, (nw - s) // 2
        canvas[top : top + s, left : left + s] = t
    else:
        top, left = (s - nh) // 2, (s - nw) // 2
        canvas = t[top : top + nh, left : left + nw]
    out = F.interpolate(canvas[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return out.clamp(min=0).numpy()


def overlay_png(image: np.ndarray, heat: np.ndarray, path: str | PathLike[str], title: str | None = None,
                cmap: str = "jet", max_alpha: float = 0.6, dpi: int = 100) -> Path:
    """Grayscale image [H, W] in [0, 1] with `heat` [H, W] in [0, 1] on top: colour from `cmap`, opacity
    proportional to the weight (0 where the finding draws no attention). Written atomically."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if image.shape != heat.shape:
        raise ValueError(f"image {image.shape} and heatmap {heat.shape} differ in size")
    rgba = colormaps[cmap](np.clip(heat, 0, 1))
    rgba[..., 3] = np.clip(heat, 0, 1) * max_alpha
    h, w = image.shape
    # Display between 400 and 640 px wide whatever the input size (64-px test models included).
    disp_w = float(min(max(w, 400), 640))
    disp_h = disp_w * h / w
    band = 28.0 if title else 0.0
    fig = Figure(figsize=(disp_w / dpi, (disp_h + band) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, disp_h / (disp_h + band)))
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    ax.imshow(rgba, interpolation="bilinear")
    ax.set_axis_off()
    if title:
        fig.text(0.5, 1 - band / 2 / (disp_h + band), title, ha="center", va="center", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "finding"


def save_heatmaps(attention: Tensor | np.ndarray, probabilities: Sequence[float], findings: Sequence[str],
                  pixels: np.ndarray, transform: Any, out_dir: str | PathLike[str], stem: str,
                  top_k: int | None = 3, which: Sequence[int] | None = None, original_space: bool = False,
                  gamma: float = 0.5, grid: Sequence[int] | None = None, note: str | None = None) -> list[Path]:
    """Overlays for one image: `attention` [heads, C, N] from a GLoRI head, its probabilities [C].
    Draws the `top_k` most probable findings (or the indices `which`) on the model's view of the image
    (`transform.geometry(pixels)`), or on the original image with `original_space`. `note` (e.g. the kind
    of map) goes in the title."""
    a = np.asarray(attention, dtype=np.float32)
    probs = np.asarray(probabilities, dtype=np.float64)
    if which is None:
        which = list(np.argsort(-probs)[: top_k or len(findings)])
    base = np.asarray(pixels, dtype=np.float32) if original_space else transform.geometry(pixels).numpy()
    out = []
    for c in which:
        heat = attention_map(a[:, c], size=int(transform.size), grid=grid, gamma=gamma)
        if original_space:
            heat = to_image_space(heat, base.shape, transform)
        # Display scaling as matplotlib's default norm: min -> transparent, max -> full colour.
        lo, hi = float(heat.min()), float(heat.max())
        heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        title = f"{findings[c]}: p = {probs[c]:.2f}" + (f" ({note})" if note else "")
        out.append(overlay_png(base, heat, Path(out_dir) / f"{_safe(stem)}__{_safe(findings[c])}.png", title))
    return out
