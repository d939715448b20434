"""DINO / iBOT projection heads: MLP -> bottleneck -> L2 normalise -> weight-normalised prototypes.

The prototype layer is an explicit weight-norm Linear with parameters `weight_g` [K, 1] (fixed at 1, as
DINOv2's `norm_last_layer`) and `weight_v` [K, bottleneck], so the state dict has the original's key names
(`last_layer.weight_g`, `last_layer.weight_v`) and scores are cosine similarities in [-1, 1].
MLP layers sit at `mlp.0`, `mlp.2`, `mlp.4` (Linear, GELU, Linear, GELU, Linear), as in the original.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
                 nlayers: int = 3, fp32: bool = False, center: bool = False) -> None:
        super().__init__()
        # center: subtract the mean bottleneck output of the rows of each call (per process, like BatchNorm
        # without scaling) before the L2 normalisation. The MLP maps the part every image's CLS token shares
        # to one common vector; when it outgrows the image-dependent part, all normalised outputs point the
        # same way and Sinkhorn-Knopp returns uniform targets (docs/pretraining.md, "Finding a recipe").
        self.center = center
        # fp32: run the head outside autocast (bf16 rounds the normalised bottleneck and the cosine scores to
        # 8 mantissa bits, ~0.004 apart, coarser than the score differences a near-uniform head produces).
        self.fp32 = fp32
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, max(1, nlayers))
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, n_prototypes)
        # Set by the caller (the teacher's heads): keep `prenorm_stats` of each forward, for diagnostics.
        self.record_prenorm = False
        self.prenorm_stats: dict[str, Tensor] = {}

    @property
    def n_prototypes(self) -> int:
        return self.last_layer.weight_v.shape[0]

    def forward(self, x: Tensor, segments: Sequence[int] | None = None, valid: Tensor | None = None) -> Tensor:
        """Scores of the rows of `x`. For centring only: `segments`, the row counts of the parts of one call that
        are centred apart (a shared head scores CLS tokens and patch tokens in one call, and their common parts
        differ); `valid`, which rows are real (a masked-patch buffer's padding rows must not move the mean)."""
        if self.fp32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                # The parameters' dtype: fp32, or the param dtype an FSDP mixed-precision policy casts to.
                return self._scores(x.to(self.last_layer.weight_v.dtype), segments, valid)
        return self._scores(x, segments, valid)

    def _scores(self, x: Tensor, segments: Sequence[int] | None = None, valid: Tensor | None = None) -> Tensor:
        x = self.mlp(x)
        if self.record_prenorm:
            self.prenorm_stats = prenorm_stats(x)  # before centring: how much common mode the MLP makes
        if self.center:
            x = centre_rows(x, segments, valid)
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x)


def centre_rows(x: Tensor, segments: Sequence[int] | None = None, valid: Tensor | None = None) -> Tensor:
    """Each segment of rows minus the mean of its valid rows (no host sync); a one-row segment is left as is
    (nothing to centre against)."""
    w = (valid.to(x.dtype) if valid is not None else x.new_ones(x.shape[0]))[:, None]
    parts, start = [], 0
    for n in segments if segments is not None else [x.shape[0]]:
        xs, ws = x[start:start + n], w[start:start + n]
        parts.append(xs if n <= 1 else xs - (xs * ws).sum(0, keepdim=True) / ws.sum().clamp_min(1.0))
        start += n
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@torch.no_grad()
def prenorm_stats(x: Tensor) -> dict[str, Tensor]:
    """Health of the bottleneck output before the L2 normalisation (rows [M, bottleneck]), no host sync.

    `head_prenorm_norm`: mean row norm; the gradient reaching the MLP through the normalisation scales like
    1 / norm, so a growing norm starves the head. `head_alignment`: length of the mean unit row, 1 when
    every row points the same way (the head maps all images to one vector; Sinkhorn-Knopp then returns
    exactly uniform targets) and ~1/sqrt(M) for unrelated rows.
    """
    xf = x.detach().float()
    if xf.shape[0] == 0:
        z = xf.new_zeros(())
        return {"head_prenorm_norm": z, "head_alignment": z}
    n = xf.norm(dim=-1)
    u = xf / n.clamp_min(1e-12).unsqueeze(-1)
    return {"head_prenorm_norm": n.mean(), "head_alignment": u.mean(dim=0).norm()}
