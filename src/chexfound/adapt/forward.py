"""One backbone + head forward pass on normalised images, shared by everything that runs a head on pixels:
serve's `Classifier` (predict, serve, export), the localisation protocol's heatmaps and the demo's overlays.

The head reads the backbone's last `head.n_blocks` blocks as `get_intermediate_layers(x, n,
return_class_token=True)` returns them: the same features a `FeatureCache` stores for training.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn


class HeadOutput(NamedTuple):
    features: tuple[tuple[Tensor, Tensor], ...]  # per block (patch tokens [B, N, D], class token [B, D])
    logits: Tensor                                # [B, C]
    attention: Tensor | None                      # [B, heads, C, N] for heads that attend (GLoRI), else None


def head_forward(backbone: nn.Module, head: nn.Module, x: Tensor) -> HeadOutput:
    """Normalised images x [B, 3, S, S] (on the backbone's device) -> the backbone's features of the blocks the
    head reads, the head's logits and its attention maps (None when it has none)."""
    feats = tuple(backbone.get_intermediate_layers(x, n=head.n_blocks, return_class_token=True))
    logits, attention = head(feats)
    return HeadOutput(feats, logits, attention)
