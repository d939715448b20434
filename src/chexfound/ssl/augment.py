"""Multi-crop augmentation for grayscale CXRs, batched with torch ops on whatever device the images are on.

Input: a batch of square grayscale images `[B, 1, S, S]` (uint8 or float in [0, 1]), as the data pipelines
deliver them (decoded once, shorter side resized to the global crop size, centre-cropped). Output: 2 global
crops `[2B, 3, G, G]` and `n` local crops `[nB, 3, L, L]`, ordered crop-major (all images' first crop, then
all images' second crop, ...) as DINOv2's collate does, so `chunk(2)` splits the two global views.

Per crop, in the order of the original (DINOv2 `DataAugmentationDINO`):
  RandomResizedCrop (scale range, aspect 3/4..4/3, torchvision's 10-try rule) + horizontal flip
  -> brightness/contrast jitter (random order, with probability `jitter_p`)
  -> Gaussian blur (kernel 9, sigma in [0.1, 2]) with a per-crop-kind probability
  -> solarize (second global crop only) -> 3 channels, mean/std normalisation.

What is *not* here on purpose: ColorJitter's saturation and hue and RandomGrayscale. The original applies
them, but its inputs are 3-channel copies of grayscale images, on which they do nothing; offering them would
only pretend to augment.

Presets:
  `dinov2_original`: what the released CheXFound code actually does. Its GaussianBlur wrapper passes `1 - p` to
      RandomApply (an inherited DINOv2 bug, facebookresearch/dinov2 PR #411), so the written probabilities
      (1.0, 0.1, 0.5) become effective probabilities (0.0, 0.9, 0.5) for (global 1, global 2, local).
  `cxr`: the intended probabilities (1.0, 0.1, 0.5); otherwise the same ops.
Crops are resampled with `grid_sample` (bicubic by default as the original, no antialiasing: the source is
already at the global crop size, so crops are upsampled or mildly downsampled).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from chexfound.data.transform import normalise_channels
from chexfound.errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    # Effective blur probabilities for (global crop 1, global crop 2, local crops).
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_kernel: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2  # second global crop only
    solarize_threshold: float = 128 / 255
    interpolation: str = "bicubic"  # bicubic | bilinear
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "dinov2_original": AugmentConfig(blur_p=(0.0, 0.9, 0.5)),
    "cxr": AugmentConfig(blur_p=(1.0, 0.1, 0.5)),
}


def augment_config(preset: str, overrides: dict[str, Any] | None = None) -> AugmentConfig:
    if preset not in AUGMENT_PRESETS:
        raise ConfigError(None, f"unknown augment.preset {preset!r}; known: {sorted(AUGMENT_PRESETS)}")
    cfg = AUGMENT_PRESETS[preset]
    if overrides:
        known = {f.name for f in fields(AugmentConfig)}
        bad = set(overrides) - known
        if bad:
            raise ConfigError(None, f"unknown augment.overrides keys {sorted(bad)}; known: {sorted(known)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        cfg = replace(cfg, **fixed)
    if cfg.interpolation not in ("bicubic", "bilinear"):
        raise ConfigError(None, "augment interpolation must be bicubic or bilinear")
    if cfg.blur_kernel % 2 != 1:
        raise ConfigError(None, "augment blur_kernel must be odd")
    return cfg


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def sample_crop_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
    gen: torch.Generator, device: torch.device, tries: int = 10,
) -> Tensor:
    """torchvision RandomResizedCrop.get_params, vectorised: [n, 4] float (top, left, h, w) in pixels."""
    area = float(height * width)
    target = area * _uniform(n * tries, scale[0], scale[1], gen, device).view(n, tries)
    log_r = _uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), gen, device).view(n, tries)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.to(torch.int8), dim=1)  # first valid try (0 if none valid)
    any_ok = ok.any(dim=1)
    rows = torch.arange(n, device=device)
    w, h = w[rows, first], h[rows, first]
    u = torch.rand(n, 2, generator=gen, device=device)
    top = torch.floor(u[:, 0] * (height - h + 1)).clamp(min=0)
    left = torch.floor(u[:, 1] * (width - w + 1)).clamp(min=0)
    # Fallback (no valid try): the central crop, aspect clamped to the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), float(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = float(height), float(round(height * ratio[1]))
    else:
        fw, fh = float(width), float(height)
    fb = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], device=device)
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(any_ok[:, None], boxes, fb.expand(n, 4))


def crop_resize(images: Tensor, boxes: Tensor, flip: Tensor, size: int, mode: str) -> Tensor:
    """Resample boxes of each image to size x size (mirrored where `flip`) with one affine grid_sample.

    images [B, 1, H, W]; boxes [V, B, 4] (top, left, h, w); flip [V, B]. Returns [V * B, 1, size, size],
    view-major. All V views of an image are sampled in one call (a grid V*size tall), so the source batch
    is never copied V times.
    """
    b, _, height, width = images.shape
    v = boxes.shape[0]
    top, left, h, w = boxes.reshape(v * b, 4).unbind(1)
    # align_corners=False: normalised -1/+1 are the outer pixel edges, so the box edges map exactly.
    cx = -1.0 + (2 * left + w) / width
    cy = -1.0 + (2 * top + h) / height
    sx = (w / width) * torch.where(flip.reshape(-1), -1.0, 1.0)
    sy = h / height
    theta = torch.zeros(v * b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta, [v * b, 1, size, size], align_corners=False)  # [V*B, s, s, 2]
    grid = grid.view(v, b, size, size, 2).transpose(0, 1).reshape(b, v * size, size, 2)
    out = F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
    out = out.view(b, v, size, size).transpose(0, 1).reshape(v * b, 1, size, size)
    return out.clamp_(0.0, 1.0) if mode == "bicubic" else out


def _brightness(x: Tensor, b: Tensor) -> Tensor:
    return (x * b.view(-1, 1, 1, 1)).clamp(0.0, 1.0)


def _contrast(x: Tensor, c: Tensor) -> Tensor:
    # torchvision adjust_contrast: blend with the image's mean gray level.
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    c = c.view(-1, 1, 1, 1)
    return (c * x + (1 - c) * m).clamp(0.0, 1.0)


def jitter(x: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """Brightness and contrast in a random order (ColorJitter permutes its ops), with probability jitter_p."""
    n, dev = x.shape[0], x.device
    if cfg.jitter_p <= 0 or (cfg.brightness <= 0 and cfg.contrast <= 0):
        return x
    b = _uniform(n, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, gen, dev)
    c = _uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, gen, dev)
    r = torch.rand(n, 2, generator=gen, device=dev)
    apply, b_first = r[:, 0] < cfg.jitter_p, r[:, 1] < 0.5
    bc = _contrast(_brightness(x, b), c)
    cb = _brightness(_contrast(x, c), b)
    out = torch.where(b_first.view(-1, 1, 1, 1), bc, cb)
    return torch.where(apply.view(-1, 1, 1, 1), out, x)


def gaussian_blur(x: Tensor, p: float, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """Separable Gaussian blur with a per-image sigma, reflect padding (torchvision's tensor GaussianBlur)."""
    n, dev = x.shape[0], x.device
    sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], gen, dev)
    apply = torch.rand(n, generator=gen, device=dev) < p
    if p <= 0 or not bool(apply.any()):
        return x
    idx = apply.nonzero().squeeze(1)
    k = cfg.blur_kernel
    half = (k - 1) / 2
    t = torch.linspace(-half, half, k, device=dev, dtype=x.dtype)
    ker = torch.exp(-0.5 * (t[None] / sigma[idx, None].to(x.dtype)) ** 2)
    ker = ker / ker.sum(dim=1, keepdim=True)  # [m, k]
    sel = x[idx].transpose(0, 1)  # [1, m, H, W]: one group per image
    m = sel.shape[1]
    pad = k // 2
    sel = F.conv2d(F.pad(sel, (pad, pad, 0, 0), mode="reflect"), ker.view(m, 1, 1, k), groups=m)
    sel = F.conv2d(F.pad(sel, (0, 0, pad, pad), mode="reflect"), ker.view(m, 1, k, 1), groups=m)
    out = x.clone()
    out[idx] = sel.transpose(0, 1)
    return out


def solarize(x: Tensor, p: float, threshold: float, gen: torch.Generator) -> Tensor:
    apply = torch.rand(x.shape[0], generator=gen, device=x.device) < p
    sol = torch.where(x >= threshold, 1.0 - x, x)
    return torch.where(apply.view(-1, 1, 1, 1), sol, x)


class MultiCropAugment:
    """2 global + `n_local` local crops per image, all on the images' device."""

    def __init__(
        self,
        global_size: int,
        local_size: int,
        n_local: int,
        global_scale: tuple[float, float],
        local_scale: tuple[float, float],
        cfg: AugmentConfig,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.cfg = cfg
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], mean: tuple, std: tuple) -> "MultiCropAugment":
        c = cfg["crops"]
        aug = augment_config(cfg["augment"]["preset"], cfg["augment"].get("overrides") or {})
        return cls(c["global_crops_size"], c["local_crops_size"], c["local_crops_number"],
                   tuple(c["global_crops_scale"]), tuple(c["local_crops_scale"]), aug, mean, std)

    def _normalise(self, x: Tensor) -> Tensor:
        return normalise_channels(x, self.mean, self.std)  # the model input's own last step

    def _views(self, src: Tensor, n_views: int, size: int, scale: tuple[float, float],
               gen: torch.Generator) -> Tensor:
        b, _, h, w = src.shape
        n = b * n_views
        # crop-major: view v of image i is row v * b + i
        boxes = sample_crop_boxes(n, h, w, scale, self.cfg.ratio, gen, src.device).view(n_views, b, 4)
        flip = (torch.rand(n, generator=gen, device=src.device) < self.cfg.flip_p).view(n_views, b)
        x = crop_resize(src, boxes, flip, size, self.cfg.interpolation)
        return jitter(x, self.cfg, gen)

    def __call__(self, images: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected grayscale images [B, 1, H, W], got {tuple(images.shape)}")
        src = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        b = src.shape[0]
        cfg = self.cfg
        g = self._views(src, 2, self.global_size, self.global_scale, gen)
        g1 = gaussian_blur(g[:b], cfg.blur_p[0], cfg, gen)
        g2 = gaussian_blur(g[b:], cfg.blur_p[1], cfg, gen)
        g2 = solarize(g2, cfg.solarize_p, cfg.solarize_threshold, gen)
        out = {"global_crops": self._normalise(torch.cat([g1, g2]))}
        if self.n_local:
            loc = self._views(src, self.n_local, self.local_size, self.local_scale, gen)
            loc = gaussian_blur(loc, cfg.blur_p[2], cfg, gen)
            out["local_crops"] = self._normalise(loc)
        else:
            out["local_crops"] = src.new_zeros((0, 3, self.local_size, self.local_size))
        return out
