"""Heatmap overlays: an attention map over the patch grid -> a coloured PNG over the model's view of the image.

The only place predict/serve turn attention into pictures. Following the original notebook: average the
heads (done in `Classifier`), upsample bilinearly to the image, rescale to [0, 1], gamma 0.5, then blend a
colour map whose opacity ramps with the attention, so low-attention regions stay plain grayscale.
The overlay is drawn on `transform.geometry(pixels)` (the resized, cropped/padded field of view the model
saw), rendered at `display_size`, which shows the same field of view as the model input at any size.
"""

from __future__ import annotations

import dataclasses
import io
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from chexfound.data.transform import InputTransform

GAMMA = 0.5
MAX_ALPHA = 0.6
COLORMAP = "jet"
DEFAULT_DISPLAY_SIZE = 512


def display_size_for(transform: InputTransform, minimum: int = DEFAULT_DISPLAY_SIZE) -> int:
    """Render at the model resolution, but never below `minimum` (a 64-px test model stays viewable)."""
    return max(transform.size, minimum)


def display_view(pixels: np.ndarray, transform: InputTransform, size: int | None = None) -> np.ndarray:
    """The model's field of view of a [H, W] image in [0, 1], as float32 [size, size] in [0, 1]."""
    size = size or display_size_for(transform)
    tf = dataclasses.replace(transform, size=size)
    return tf.geometry(pixels).numpy()


def view_from_input(x: torch.Tensor, transform: InputTransform, size: int | None = None) -> np.ndarray:
    """Recover the model's view from a normalised input [3, S, S] (undo mean/std on one channel), as
    float32 [size, size] in [0, 1] — lets batch jobs draw overlays without decoding the file again."""
    g = (x[0].float() * transform.std[0] + transform.mean[0]).clamp(0.0, 1.0)
    size = size or display_size_for(transform)
    if size != g.shape[-1]:
        g = F.interpolate(g[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return g.clamp(0.0, 1.0).numpy()


def heat(attention: np.ndarray, size: int) -> np.ndarray:
    """One finding's [gh, gw] attention -> [size, size] float32 in [0, 1] (bilinear, min-max, gamma)."""
    a = torch.as_tensor(np.asarray(attention, dtype=np.float32))[None, None]
    up = F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    lo, hi = float(up.min()), float(up.max())
    up = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    return np.power(up, GAMMA, dtype=np.float32)


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]).astype(np.float32)


def blend(gray: np.ndarray, heatmap: np.ndarray, max_alpha: float = MAX_ALPHA, cmap: str = COLORMAP) -> np.ndarray:
    """gray [S, S] in [0, 1] + heatmap [S, S] in [0, 1] -> uint8 RGB [S, S, 3]."""
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
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def overlay_png(gray: np.ndarray, attention: np.ndarray) -> bytes:
    return png_bytes(overlay(gray, attention))
