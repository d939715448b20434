"""A heatmap for every head, and what kind of map it is.

Three kinds, chosen per head by `heatmap_kind`:
- "glori_attention": a GLoRI head's own per-finding cross-attention over the patches (heads averaged).
- "linear_patch_contribution": a linear head that reads the mean patch token (`avgpool`) is additive over
  patches: its logit holds the term w_patch . mean_i(p_i) = sum_i (w_patch . p_i) / N, so each patch's share
  (w_patch . p_i) / N is exact, per finding, and the shares sum to that term (the CLS part of the logit is
  not spatial and is not in the map). Shares can be negative (evidence against); maps are drawn clipped at 0.
- "cls_attention": any other head (a linear or MLP head on CLS tokens only, an MLP on the mean patch): the
  last backbone block's attention from the CLS token to the patches, heads averaged, register tokens (and the
  CLS token itself) left out. It is the same map for every finding: where the model looked, not why.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

GLORI_ATTENTION = "glori_attention"
LINEAR_CONTRIBUTION = "linear_patch_contribution"
CLS_ATTENTION = "cls_attention"
KIND_DESCRIPTIONS = {
    GLORI_ATTENTION: "GLoRI attention: the head's per-finding cross-attention over the image patches",
    LINEAR_CONTRIBUTION: "patch contributions: each patch's exact additive share of the linear head's logit "
                         "(positive part shown)",
    CLS_ATTENTION: "CLS attention: the last backbone block's attention from the CLS token to the patches "
                   "(registers left out; the same map for every finding)",
}


def heatmap_kind(head: Any) -> str:
    """Which map `head` gets (see the module docstring)."""
    if bool(getattr(head, "has_attention", False)):
        return GLORI_ATTENTION
    if getattr(head, "head_type", "") == "linear" and bool(getattr(head, "avgpool", False)):
        return LINEAR_CONTRIBUTION
    return CLS_ATTENTION


def patch_weights(head: nn.Module) -> Tensor:
    """The linear head's weights on the mean patch token: [out_dim, D] (the last D input columns)."""
    d = int(head.embed_dim)  # type: ignore[arg-type]
    return head.linear.weight[:, -d:]  # type: ignore[union-attr,index]


def patch_contributions(head: nn.Module, patch_tokens: Tensor) -> Tensor:
    """A linear avgpool head's per-patch logit shares [B, out_dim, N] from the last block's patch tokens
    [B, N, D]: (w_patch . p_i) / N. Summed over patches: the logit's mean-patch term w_patch . mean(p)."""
    w = patch_weights(head).float()
    p = patch_tokens.float()
    return torch.einsum("bnd,cd->bcn", p, w) / p.shape[1]


def cls_attention_from_input(attn: nn.Module, x: Tensor, num_register_tokens: int) -> Tensor:
    """The CLS row of a ViT attention layer's softmax for its (normed) input x [B, T, D], tokens ordered
    [CLS, registers, patches]: [B, N_patches], averaged over heads, registers and CLS dropped."""
    b, t, c = x.shape
    h = int(attn.num_heads)  # type: ignore[arg-type]
    qkv = attn.qkv(x).reshape(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4)  # type: ignore[operator]
    q, k = qkv[0][:, :, :1], qkv[1]
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, h, 1, T]
    return weights[:, :, 0, 1 + num_register_tokens:].float().mean(dim=1)


class LastBlockInput:
    """Keeps the input of the backbone's last attention layer from each forward pass (a forward pre-hook),
    so the CLS attention map costs one extra q.k row instead of a second backbone pass."""

    def __init__(self, backbone: nn.Module) -> None:
        self.attn = backbone.blocks[-1].attn  # type: ignore[index,union-attr]
        self.num_register_tokens = int(getattr(backbone, "num_register_tokens", 0))
        self.x: Tensor | None = None
        self._handle = self.attn.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.x = args[0]

    def cls_attention(self) -> Tensor | None:
        """The CLS attention of the last forward pass (None when the hook did not run, e.g. in a compiled
        block that inlined the layer: no map rather than a stale one)."""
        if self.x is None:
            return None
        x, self.x = self.x, None
        return cls_attention_from_input(self.attn, x, self.num_register_tokens)

    def remove(self) -> None:
        self._handle.remove()

