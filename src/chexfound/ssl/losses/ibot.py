"""iBOT's masked-patch loss: the DINO cross-entropy on masked patch tokens (student sees the mask token, the
teacher sees the real patch), each image's masked patches averaged, then averaged over *all* global crops
(unmasked crops count as zero, as in DINOv2)."""

from __future__ import annotations

import torch
from torch import Tensor

from chexfound.ssl.losses.dino import dino_cross_entropy


def masked_patch_weights(masks: Tensor) -> Tensor:
    """1 / (#masked patches of its image) for each masked patch, in `masks.flatten().nonzero()` order."""
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


def ibot_patch_loss(student_logits: Tensor, teacher_probs: Tensor, masks: Tensor, student_temp: float,
                    weights: Tensor | None = None) -> Tensor:
    """student_logits/teacher_probs [M, K] for the M masked patches; masks [n_images, N] bool.
    `weights` [M]: the per-patch weights when the rows are a padded buffer (`masking.gather_masked`: 0 for
    padding), instead of `masked_patch_weights(masks)` (which needs M = the exact count)."""
    n_images = masks.shape[0]
    if student_logits.shape[0] == 0 or n_images == 0:
        return torch.zeros((), device=masks.device)
    ce = dino_cross_entropy(student_logits, teacher_probs, student_temp)
    w = masked_patch_weights(masks) if weights is None else weights
    return (ce * w.to(ce.device)).sum() / n_images
