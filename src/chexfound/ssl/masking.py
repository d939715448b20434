"""iBOT block masking (BEiT's MaskingGenerator) and the per-batch mask sampling of DINOv2's collate.

Per batch of global crops: `int(n * mask_sample_probability)` crops get a mask, the i-th of them with a
masked fraction drawn uniformly from the i-th interval of linspace(min_ratio, max_ratio, n_masked + 1)
(stratified, so a batch always spans the whole range); the others get none; the assignment is shuffled.
A mask is grown from random rectangles of >= `min_patches` patches and aspect ratio in [0.3, 1/0.3].

Two implementations of the same recipe:
  `BlockMaskGenerator` + `sample_batch_masks`: BEiT's loop in numpy on the host (the reference).
  `DeviceBlockMasks` + `sample_batch_masks_device`: all masks of a batch grown at once with torch ops on the
      training device from a torch.Generator (no host work, no copy, no sync). The 10 tries of one BEiT
      "add a block" call are drawn side by side and the first acceptable one is taken, which is the same
      distribution as trying them one after another; the calls themselves run for a fixed number of rounds
      (`rounds_for`), beyond the 99.9th percentile of what BEiT's loop needs (tests/ssl/test_masking.py
      compares the statistics of both).
`gather_masked` lists the masked patches in a buffer of fixed size (DINOv2's upper bound of masked patches
per batch) with a validity weight, so every shape of a training step is known before it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


class BlockShape:
    """The block-mask geometry both generators share: the patch grid, block sizes, aspect-ratio range."""

    def __init__(
        self,
        grid: tuple[int, int],
        min_patches: int = 4,
        max_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_patches = min_patches
        self.max_patches = self.num_patches if max_patches is None else max_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))


class BlockMaskGenerator(BlockShape):
    """BEiT block masks on the host (numpy), one image at a time: the reference path."""

    def _add_block(self, mask: np.ndarray, max_new: int, rng: np.random.Generator) -> int:
        """Try (10 times) to add one rectangle with 1..max_new new patches; returns how many it added."""
        for _ in range(10):
            # (min and max may cross when few patches remain; uniform() between them either way)
            lo, hi = sorted((self.min_patches, max_new))
            target = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_new:
                    block[...] = True
                    return new
        return 0

    def __call__(self, n_masked: int, rng: np.random.Generator) -> np.ndarray:
        """A [height, width] bool mask with (at most, usually exactly) `n_masked` patches set."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < n_masked:
            added = self._add_block(mask, min(n_masked - count, self.max_patches), rng)
            if added == 0:
                break
            count += added
        return mask


def sample_batch_masks(
    n_images: int,
    generator: BlockMaskGenerator,
    mask_probability: float,
    ratio_min_max: tuple[float, float],
    rng: np.random.Generator,
) -> Tensor:
    """[n_images, N] bool masks for the global crops of one batch (DINOv2 collate's recipe)."""
    n_tokens = generator.num_patches
    n_masked_images = int(n_images * mask_probability)
    probs = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked_images + 1)
    masks = []
    for i in range(n_masked_images):
        ratio = rng.uniform(probs[i], probs[i + 1])
        masks.append(generator(int(n_tokens * ratio), rng).reshape(-1))
    masks += [np.zeros(n_tokens, dtype=bool)] * (n_images - n_masked_images)
    order = rng.permutation(n_images)
    return torch.from_numpy(np.stack([masks[i] for i in order]) if masks else np.zeros((0, n_tokens), bool))


# -- on the device ---------------------------------------------------------------------------------
def rounds_for(num_patches: int) -> int:
    """Rounds of block additions run for a grid of `num_patches`: BEiT's loop needs at most ~1.5 log2(N) + 1
    calls for 99.9% of masks (measured: 12 of 13 at 14 x 14, 17 of 19 at 32 x 32); 2 log2(N) + 2 leaves a
    margin. An image still growing after the last round keeps the patches it has (slightly fewer)."""
    return int(math.ceil(2 * math.log2(max(num_patches, 2)))) + 2


class DeviceBlockMasks(BlockShape):
    """BEiT block masks for many images at once, on the device of the targets; see the module docstring."""

    def __init__(self, grid: tuple[int, int], tries: int = 10, rounds: int | None = None, **shape: Any) -> None:
        """`shape`: min_patches, max_patches, min_aspect, max_aspect as `BlockShape`."""
        super().__init__(grid, **shape)
        self.tries = tries
        self.rounds = rounds_for(self.num_patches) if rounds is None else rounds

    def __call__(self, target: Tensor, gen: torch.Generator) -> Tensor:
        """[n, height, width] bool masks with at most (usually exactly) `target[i]` patches set ([n] long)."""
        n, dev = target.shape[0], target.device
        h_grid, w_grid, t = self.height, self.width, self.tries
        mask = torch.zeros(n, h_grid, w_grid, device=dev)  # 0/1 floats: overlaps are counted by a matmul
        count = torch.zeros(n, dtype=torch.long, device=dev)
        active = target > 0
        rows = torch.arange(h_grid, device=dev)
        cols = torch.arange(w_grid, device=dev)
        pick = torch.arange(n, device=dev)
        u = torch.rand(self.rounds, n, t, 4, generator=gen, device=dev)  # every draw of the batch, one kernel
        la0, la1 = self.log_aspect
        sqrt_aspect = torch.exp(0.5 * (la0 + (la1 - la0) * u[..., 1]))
        for r in range(self.rounds):
            # One BEiT `_add_block` call per image: up to `tries` rectangles against the current mask.
            max_new = (target - count).clamp(max=self.max_patches).unsqueeze(1).float()  # [n, 1]
            lo = max_new.clamp(max=float(self.min_patches))
            hi = max_new.clamp(min=float(self.min_patches))
            root = torch.sqrt(lo + (hi - lo) * u[r, :, :, 0])  # sqrt(target area)
            h = torch.round(root * sqrt_aspect[r])
            w = torch.round(root / sqrt_aspect[r])
            top = torch.floor(u[r, :, :, 2] * (h_grid - h + 1)).unsqueeze(-1)
            left = torch.floor(u[r, :, :, 3] * (w_grid - w + 1)).unsqueeze(-1)
            in_rows = ((rows >= top) & (rows < top + h.unsqueeze(-1))).float()  # [n, tries, H]
            in_cols = ((cols >= left) & (cols < left + w.unsqueeze(-1))).float()  # [n, tries, W]
            # patches of each rectangle already masked: sum_hw rows[h] mask[h, w] cols[w] (exact small integers)
            overlap = (torch.bmm(in_rows, mask) * in_cols).sum(dim=-1)
            new = in_rows.sum(-1) * in_cols.sum(-1) - overlap  # [n, tries]
            ok = (w < w_grid) & (h < h_grid) & (new > 0) & (new <= max_new)
            first = ok.to(torch.int8).argmax(dim=1)  # the first acceptable try
            hit = (ok.any(dim=1) & active).float()
            block = in_rows[pick, first].unsqueeze(2) * in_cols[pick, first].unsqueeze(1)  # [n, H, W]
            mask = torch.maximum(mask, block * hit.view(n, 1, 1))
            count += (new[pick, first] * hit).long()
            # BEiT stops an image when it is full or when a call's tries all failed.
            active = (hit > 0) & (count < target)
        return mask > 0


def masked_patch_bound(n_images: int, num_patches: int, mask_probability: float,
                       ratio_min_max: tuple[float, float]) -> int:
    """DINOv2's upper bound of masked patches in a batch: sum over masked images of int(N * upper edge of its
    ratio interval) (an image never gets more than int(N * its ratio) patches); at least 1."""
    n_masked_images = int(n_images * mask_probability)
    probs = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked_images + 1)
    return max(1, sum(int(num_patches * float(p)) for p in probs[1:]))


def sample_batch_masks_device(
    n_images: int,
    generator: DeviceBlockMasks,
    mask_probability: float,
    ratio_min_max: tuple[float, float],
    gen: torch.Generator,
    device: torch.device,
) -> Tensor:
    """[n_images, N] bool masks on `device`: `sample_batch_masks`'s recipe, drawn from `gen`."""
    n_tokens = generator.num_patches
    n_masked_images = int(n_images * mask_probability)
    masks = torch.zeros(n_images, n_tokens, dtype=torch.bool, device=device)
    if n_masked_images:
        edges = torch.linspace(ratio_min_max[0], ratio_min_max[1], n_masked_images + 1, device=device,
                               dtype=torch.float64)
        u = torch.rand(n_masked_images, generator=gen, device=device, dtype=torch.float64)
        ratio = edges[:-1] + (edges[1:] - edges[:-1]) * u  # stratified: the i-th image in the i-th interval
        target = torch.floor(n_tokens * ratio).long()
        masks[:n_masked_images] = generator(target, gen).reshape(n_masked_images, n_tokens)
    order = torch.randperm(n_images, generator=gen, device=device)
    return masks[order]


@dataclass
class MaskedPatches:
    """The masked patches of a batch in a buffer of fixed length `bound` (row order = `masks.flatten()`)."""

    idx: Tensor  # [bound] long: flat index image * N + patch; padding points at patch 0
    valid: Tensor  # [bound] bool
    weight: Tensor  # [bound] float32: 1 / (masked patches of its image), 0 for padding (iBOT's per-image mean)
    count: Tensor  # 0-dim long: masked patches in the batch


def gather_masked(masks: Tensor, bound: int) -> MaskedPatches:
    """`masks.flatten().nonzero()` padded to `bound` entries, without waiting for the device."""
    n_images, n_tokens = masks.shape
    flat = masks.reshape(-1)
    dev = flat.device
    rank = torch.cumsum(flat, dim=0) - 1  # position of each masked patch in the list
    slot = torch.where(flat & (rank < bound), rank, bound)  # everything else goes to a spill slot, dropped
    idx = torch.zeros(bound + 1, dtype=torch.long, device=dev)
    idx.scatter_(0, slot, torch.arange(flat.shape[0], device=dev))
    idx = idx[:bound]
    count = flat.sum()
    valid = torch.arange(bound, device=dev) < count
    per_image = 1.0 / masks.sum(dim=1).clamp(min=1).float()
    weight = per_image[idx // n_tokens] * valid
    return MaskedPatches(idx=idx, valid=valid, weight=weight, count=count)
