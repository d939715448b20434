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
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3,
                   valid: Tensor | None = None) -> Tensor:
    """Teacher targets [M, K] (rows sum to 1) from scores [M, K] (DINOv2/SwAV Sinkhorn-Knopp).

    Q = exp(s / T)^T (K x B), Q /= sum(Q); repeat: rows /= row sums, /= K; columns /= column sums, /= B;
    then Q * B, transposed back. We subtract the global max of s before exp (the normalisation cancels it),
    so large scores cannot overflow; sums are floored at the smallest normal float so underflow cannot
    divide by zero. M may differ between ranks (iBOT: masked patches per rank). `valid` [M] (bool) leaves
    padding rows out (their targets are 0): the result on the valid rows equals that of the valid rows alone.
    Nothing here waits for the device (B stays a tensor), so a training step needs no host sync.
    """
    s = teacher_logits.float()
    if valid is None:
        m = torch.full((1,), float(s.shape[0]), device=s.device)
    else:
        m = valid.sum().float().reshape(1)
        s = s.masked_fill(~valid.unsqueeze(1), -float("inf"))
    D.all_reduce_sum(m)
    smax = s.max() if s.numel() else s.new_tensor(-float("inf"))
    smax = D.all_reduce_max(smax.reshape(1).clone())
    smax = torch.where(torch.isfinite(smax), smax, 0.0)  # no valid row on any rank: all targets 0
    q = torch.exp((s - smax) / teacher_temp).t()  # K x M (padding rows: exp(-inf) = 0)
    b = m.clamp_min(1.0)  # B = 0 gives zeros below, as B = 1 would
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
    def update(self, teacher_logits: Tensor, weights: Tensor | None = None) -> None:
        """`weights` [M] (0/1) leave padding rows out. Without a host sync: a batch without rows, or with
        non-finite scores, leaves the centre as it is."""
        s = teacher_logits.float()
        w = torch.ones(s.shape[0], device=s.device) if weights is None else weights.float()
        stats = torch.cat([(s * w.unsqueeze(1)).sum(dim=0), w.sum().reshape(1)])
        D.all_reduce_sum(stats)
        n = stats[-1]
        batch_center = (stats[:-1] / n.clamp_min(1.0)).unsqueeze(0)
        new = self.center * self.momentum + batch_center * (1 - self.momentum)
        keep = (n == 0) | ~torch.isfinite(batch_center).all()
        self.center.copy_(torch.where(keep, self.center, new))
