"""DINO's CLS-token self-distillation loss: cross-entropy between teacher targets and the student's
temperature-softmaxed prototype scores, H(t, s) = -sum_k t_k log softmax(s / T_s)_k."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def dino_cross_entropy(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """Per-row cross-entropy [B] (fp32)."""
    lsm = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * lsm).sum(dim=-1)


def dino_cls_loss(
    student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor], student_temp: float
) -> Tensor:
    """Sum over every (student view, teacher view) pair of the batch-mean cross-entropy.

    The caller normalises by the number of pair terms (DINOv2: 2 global-global + 2 * n_local terms), and
    passes views so that no student view is paired with the same teacher view (see meta_arch).
    """
    total = torch.zeros((), device=student_logits[0].device)
    for s in student_logits:
        lsm = torch.log_softmax(s.float() / student_temp, dim=-1)
        for t in teacher_probs:
            total = total - (t.float() * lsm).sum(dim=-1).mean()
    return total
