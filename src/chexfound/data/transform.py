"""The model input transform shared by every stage (embed, adapt, predict, serve, pretraining probes).

grayscale [H, W] in [0, 1] -> resize shorter side to `size` (bicubic, antialiased like PIL) ->
centre-crop (or pad to square) -> per-image min-max to [0, 1] -> 3 channels -> mean/std.
This is what the original's evaluation transform does; it is recorded with every model.

It runs in two halves so a data loader can feed a GPU without becoming the bottleneck:
`prepare` (geometry + min-max, on a CPU worker; as uint8 it is 4x less to pickle, pin and copy) and
`normalise` (uint8 or float batch -> 3-channel mean/std input, on the model's device). `__call__` is the two
in one, in float32, and gives exactly what the one-piece transform gave before the split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The normalisation of DINOv2-family backbones (ImageNet statistics). Defined here, in the data layer, so the
# model configs (chexfound.models.config) take them from below rather than the data layer reaching up.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_channels(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[B, 1 or 3, H, W] in [0, 1] -> 3 channels, (x - mean) / std per channel, in x's dtype and device.
    The last step of every model input: files (`InputTransform.normalise`) and pretraining crops alike."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - m) / s


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

    def prepare(self, pixels: np.ndarray | Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The CPU half: [H, W] grayscale in [0, 1] -> [1, size, size] after geometry and min-max, as float32
        in [0, 1] or as uint8 (rounded to 8 bits: the original's PIL pipeline is 8-bit throughout)."""
        x = self.geometry(pixels)
        if self.minmax_rescale:
            lo, hi = x.min(), x.max()
            x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
        if dtype == torch.uint8:
            return (x * 255.0).round_().to(torch.uint8)[None]
        if dtype != torch.float32:
            raise ValueError(f"prepare() returns float32 or uint8, not {dtype}")
        return x[None]

    def normalise(self, x: Tensor) -> Tensor:
        """The device half: prepared images [B, 1 or 3, S, S] (uint8 in 0..255 or float in [0, 1]) ->
        float32 [B, 3, S, S] with per-image min-max (when this transform has it) and mean/std. Runs wherever
        `x` is; min-max is idempotent, so it is safe on already min-maxed input and makes raw uint8 images
        (e.g. the pretraining probe's decoded set) normalise exactly as files do."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(x.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.minmax_rescale:
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            span = hi - lo
            x = torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)
        return normalise_channels(x, self.mean, self.std)

    def __call__(self, pixels: np.ndarray | Tensor) -> Tensor:
        """[H, W] grayscale in [0, 1] -> normalised [3, size, size] float32 (`normalise(prepare(...))`)."""
        return self.normalise(self.prepare(pixels)[None])[0]
