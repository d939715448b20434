"""KoLeo regulariser (Sablayrolles et al. 2019): L = -1/n sum_i log(min_{j != i} ||x_i - x_j||) on
L2-normalised embeddings; it pushes each embedding away from its nearest neighbour (spreads the batch).

Numerically safe where DINOv2's is not: always fp32 (under fp16 autocast DINOv2's eps=1e-8 underflows to 0
and duplicates give log(0) = -inf), and the distance is the smooth sqrt(||x_i - x_j||^2 + eps^2), so exact
duplicates give a finite loss (-log eps) and a zero (not NaN) gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    if x.shape[0] < 2:
        return torch.zeros((), device=x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-float("inf"))
            nn_idx = dots.argmax(dim=1)
        d = torch.sqrt(((x - x[nn_idx]) ** 2).sum(dim=-1) + eps * eps)
        return -torch.log(d).mean()
