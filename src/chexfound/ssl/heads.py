"""DINO / iBOT projection heads: MLP -> bottleneck -> L2 normalise -> weight-normalised prototypes.

The prototype layer is an explicit weight-norm Linear with parameters `weight_g` [K, 1] (fixed at 1, as
DINOv2's `norm_last_layer`) and `weight_v` [K, bottleneck], so the state dict has the original's key names
(`last_layer.weight_g`, `last_layer.weight_v`) and scores are cosine similarities in [-1, 1].
MLP layers sit at `mlp.0`, `mlp.2`, `mlp.4` (Linear, GELU, Linear, GELU, Linear), as in the original.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """y = x W^T with W = g * v / ||v||_row (no bias)."""

    def __init__(self, in_features: int, out_features: int, train_g: bool = False) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=train_g)
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default init

    def weight(self) -> Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight())


def _mlp(in_dim: int, hidden: int, bottleneck: int, nlayers: int) -> nn.Sequential:
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden, hidden), nn.GELU()]
    layers.append(nn.Linear(hidden, bottleneck))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, n_prototypes: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3) -> None:
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, max(1, nlayers))
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, n_prototypes)

    @property
    def n_prototypes(self) -> int:
        return self.last_layer.weight_v.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x)
