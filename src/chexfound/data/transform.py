"""The model input transform shared by every stage (embed, adapt, predict, serve).

grayscale [H, W] in [0, 1] -> resize shorter side to `size` (bicubic, antialiased like PIL) ->
centre-crop (or pad to square) -> per-image min-max to [0, 1] -> 3 channels -> mean/std.
This is what the original's evaluation transform does; it is recorded with every model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The normalisation of DINOv2-family backbones (ImageNet statistics). Defined here, in the data layer, so the
# model configs (chexfound.models.config) take them from below rather than the data layer reaching up.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputTransform:
    size: int = 512
    mode: Literal["crop", "pad"] = "crop"
    minmax_rescale: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputTransform":
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    @classmethod
    def for_backbone(cls, cfg: Any, size: int | None = None, mode: str = "crop") -> "InputTransform":
        return cls(size=size or cfg.img_size, mode=mode, minmax_rescale=cfg.minmax_rescale,
                   mean=tuple(cfg.mean), std=tuple(cfg.std))

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        """Size after the resize step. As torchvision's Resize(int): the shorter side (crop mode; the longer
        in pad mode) becomes `size` and the other side is truncated, int(size * other / side)."""
        if h <= 0 or w <= 0:
            raise ValueError(f"empty image of shape ({h}, {w})")
        s = self.size
        if (h <= w) == (self.mode == "crop"):
            return s, max(1, int(s * w / h))
        return max(1, int(s * h / w)), s

    def geometry(self, pixels: np.ndarray | Tensor) -> Tensor:
        """Resize + crop/pad only: [H, W] -> [size, size] float32 tensor (used for heatmap overlays too)."""
        if isinstance(pixels, np.ndarray):
            arr = np.ascontiguousarray(pixels, dtype=np.float32)
            if not arr.flags.writeable:  # torch cannot wrap read-only memory (e.g. np.frombuffer)
                arr = arr.copy()
            x = torch.from_numpy(arr)
        else:
            x = pixels.to(torch.float32)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D grayscale image, got shape {tuple(x.shape)}")
        h, w = x.shape
        nh, nw = self.resized_shape(h, w)
        if (nh, nw) != (h, w):
            # torch's antialiased bicubic equals PIL's BICUBIC resize (what torchvision's Resize runs on PIL
            # images) to float precision, for down- and up-scaling.
            x = F.interpolate(x[None, None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0, 0]
        s = self.size
        if self.mode == "crop":
            # torchvision CenterCrop: offsets are round((n - s) / 2) with Python's rounding.
            top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
            x = x[top : top + s, left : left + s]
        else:
            pad_h, pad_w = s - nh, s - nw
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        return x.clamp(0.0, 1.0)  # not in place: without a resize x may share memory with the input

    def __call__(self, pixels: np.ndarray | Tensor) -> Tensor:
        """[H, W] grayscale in [0, 1] -> normalised [3, size, size] float32."""
        x = self.geometry(pixels)
        if self.minmax_rescale:
            lo, hi = x.min(), x.max()
            x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x[None].expand(3, -1, -1) - mean) / std
