"""iBOT block masking (BEiT's MaskingGenerator) and the per-batch mask sampling of DINOv2's collate.

Per batch of global crops: `int(n * mask_sample_probability)` crops get a mask, the i-th of them with a
masked fraction drawn uniformly from the i-th interval of linspace(min_ratio, max_ratio, n_masked + 1)
(stratified, so a batch always spans the whole range); the others get none; the assignment is shuffled.
A mask is grown from random rectangles of >= `min_patches` patches and aspect ratio in [0.3, 1/0.3].
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


class BlockMaskGenerator:
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
