"""The raw-pixel baseline's features: every image area-resized to 32 x 32 and flattened.

On small data sets 32 x 32 pixels are a strong baseline, and a small, briefly pretrained backbone must be
compared with it. One definition everywhere (pretraining probes, the demo): intensities in [0, 1] (uint8
input is divided by 255), the whole image area-averaged to size x size (no crop: the image as given), float32.
The pretraining probes give it their decoded probe images, the demo the images as read.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F


def _as_float_image(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(image)
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    t = t.squeeze()
    if t.ndim != 2:
        raise ValueError(f"expected one grayscale image [H, W] (or [1, H, W]), got shape {tuple(image.shape)}")
    return t


def pixel_vector(image: np.ndarray | torch.Tensor, size: int = 32) -> np.ndarray:
    """One image [H, W] (float in [0, 1], or uint8) -> float32 [size * size]."""
    t = _as_float_image(image)[None, None]
    return F.interpolate(t, size=(size, size), mode="area").flatten().numpy().astype(np.float32)


def pixel_features(images: Iterable[np.ndarray | torch.Tensor] | torch.Tensor, size: int = 32) -> np.ndarray:
    """Images (an iterable of [H, W] arrays, or a uint8/float batch [N, 1, H, W]) -> float32 [N, size * size]."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] != 1:
            raise ValueError(f"expected grayscale images [N, 1, H, W], got {tuple(images.shape)}")
        return F.interpolate(x, size=(size, size), mode="area").flatten(1).numpy().astype(np.float32)
    rows = [pixel_vector(im, size) for im in images]
    return np.stack(rows) if rows else np.zeros((0, size * size), dtype=np.float32)
