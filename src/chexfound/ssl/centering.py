"""Turning teacher prototype scores into targets: Sinkhorn-Knopp (the CheXFound default) or softmax centering.

Both run in fp32. Sinkhorn-Knopp is distributed-correct: the global sum, the per-prototype (row) sums and the
sample count are all-reduced over ranks, so K prototypes are equipartitioned over the *global* batch, exactly
as a single process would with the concatenated batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from chexfound.ssl import distributed as D

_TINY = torch.finfo(torch.float32).tiny


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Teacher targets [M, K] (rows sum to 1) from scores [M, K] (DINOv2/SwAV Sinkhorn-Knopp).

    Q = exp(s / T)^T (K x B), Q /= sum(Q); repeat: rows /= row sums, /= K; columns /= column sums, /= B;
    then Q * B, transposed back. We subtract the global max of s before exp (the normalisation cancels it),
    so large scores cannot overflow; sums are floored at the smallest normal float so underflow cannot
    divide by zero. M may differ between ranks (iBOT: masked patches per rank).
    """
    s = teacher_logits.float()
    m = torch.tensor([float(s.shape[0])], device=s.device)
    D.all_reduce_sum(m)
    if m.item() == 0:
        return s.new_zeros(s.shape)
    smax = s.max() if s.numel() else s.new_tensor(-float("inf"))
    smax = D.all_reduce_max(smax.reshape(1).clone())
    q = torch.exp((s - smax) / teacher_temp).t()  # K x M
    b = m.item()
    k = q.shape[0]
    total = D.all_reduce_sum(q.sum().reshape(1))
    q /= total.clamp_min(_TINY)
    for _ in range(n_iterations):
        rows = D.all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= rows.clamp_min(_TINY)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(_TINY)
        q /= b
    q *= b
    return q.t()


class SoftmaxCentering(nn.Module):
    """DINO's centering: targets softmax((s - c) / T); c <- m c + (1 - m) mean_batch(s) after each use."""

    def __init__(self, n_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def targets(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        return torch.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        s = teacher_logits.float()
        stats = torch.cat([s.sum(dim=0), s.new_tensor([float(s.shape[0])])])
        D.all_reduce_sum(stats)
        n = stats[-1]
        if n.item() == 0:
            return
        batch_center = (stats[:-1] / n).unsqueeze(0)
        self.center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)
