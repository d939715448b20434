"""A DINOv2/CheXFound vision transformer with register tokens, LayerScale and packed SwiGLU.

Parameter names follow the original (flat `blocks.<i>.`), so foreign checkpoints map one-to-one.
Attention runs through `scaled_dot_product_attention` (no xFormers).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chexfound.models.config import ViTConfig


def resize_pos_embed(pos_embed: Tensor, grid: tuple[int, int], offset: float, antialias: bool) -> Tensor:
    """Resize the patch part of a [1, 1 + M*M, D] position embedding to `grid` (rows, cols), bicubic in fp32.

    The original's semantics: with `offset` > 0 the resize is specified by scale_factor (rows + offset) / M
    (the DINO "kludge"; F.interpolate then maps output to input coordinates with that scale, not with
    rows / M), otherwise by the output size. The CLS entry is kept as is. Returns fp32.
    """
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position embedding has {n} patch entries, not a square grid")
    rows, cols = grid
    pos = pos_embed.float()
    patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        scale = (float(rows + offset) / m, float(cols + offset) / m)
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        patch = F.interpolate(patch, size=(rows, cols), mode="bicubic", antialias=antialias)
    if tuple(patch.shape[-2:]) != (rows, cols):
        raise RuntimeError(f"position embedding resized to {tuple(patch.shape[-2:])}, expected {(rows, cols)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    return torch.cat((pos[:, :1], patch), dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)


_FUSED_ATTENTION = True


@contextmanager
def explicit_attention() -> Iterator[None]:
    """Within this block attention runs op by op as the original's non-xFormers fallback does
    (softmax((q * scale) @ k^T) @ v) instead of fused SDPA: the same maths with the original's rounding
    order, for comparisons against it tighter than fp32 summation-order noise (~1e-6 per block)."""
    global _FUSED_ATTENTION
    prev, _FUSED_ATTENTION = _FUSED_ATTENTION, False
    try:
        yield
    finally:
        _FUSED_ATTENTION = prev


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if return_attention or not _FUSED_ATTENTION:
            # The explicit path: when a caller wants the softmax maps, or inside explicit_attention().
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(b, n, c))
        return (out, attn) if return_attention else out


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Hidden width of the original packed SwiGLU: 2/3 of the MLP width, rounded up to a multiple of 8."""
    hidden = int(int(dim * mlp_ratio) * 2 / 3)
    return (hidden + 7) // 8 * 8


class SwiGLU(nn.Module):
    """Packed SwiGLU: `w12` holds [gate; value] rows, hidden = silu(gate) * value."""

    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Per-sample stochastic depth (used by the original for rates <= 0.1)."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


def add_residual_batch_subset(x: Tensor, branch: Callable[[Tensor], Tensor], p: float) -> Tensor:
    """The original's stochastic depth for rates > 0.1: run `branch` on a random subset of
    max(1, int(B * (1 - p))) samples and add it back scaled by B / subset. Same expectation as per-sample
    drop path, and it skips the dropped samples' compute (that is why the original uses it)."""
    b = x.shape[0]
    keep = max(int(b * (1 - p)), 1)
    idx = torch.randperm(b, device=x.device)[:keep]
    res = branch(x[idx])
    return torch.index_add(x.flatten(1), 0, idx, res.flatten(1).to(x.dtype), alpha=b / keep).view_as(x)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path_rate: float) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, cfg.proj_bias)
        self.ls1 = LayerScale(d, cfg.layerscale_init) if cfg.layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        if cfg.ffn_layer == "swiglu":
            self.mlp: nn.Module = SwiGLU(d, swiglu_hidden(d, cfg.mlp_ratio), cfg.ffn_bias)
        elif cfg.ffn_layer == "mlp":
            self.mlp = Mlp(d, int(d * cfg.mlp_ratio), cfg.ffn_bias)
        else:
            raise ValueError(f"unknown ffn_layer {cfg.ffn_layer!r} (expected 'mlp' or 'swiglu')")
        self.ls2 = LayerScale(d, cfg.layerscale_init) if cfg.layerscale_init else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def _attn_branch(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if return_attention:
            a, attn = self.attn(self.norm1(x), return_attention=True)
            x = x + self.ls1(a)
            x = x + self._ffn_branch(x)
            return x, attn
        p = self.drop_path_rate
        if self.training and p > 0.1:
            x = add_residual_batch_subset(x, self._attn_branch, p)
            return add_residual_batch_subset(x, self._ffn_branch, p)
        x = x + drop_path(self._attn_branch(x), p, self.training)
        return x + drop_path(self._ffn_branch(x), p, self.training)


class VisionTransformer(nn.Module):
    """Token order `[CLS, registers, patches]`; registers carry no position embedding."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.embed_dim = d
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, d))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d)) if cfg.num_register_tokens else None
        )
        rates = (
            [cfg.drop_path_rate] * cfg.depth
            if cfg.drop_path_uniform
            else [float(v) for v in torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()]
        )
        self.blocks = nn.ModuleList([Block(cfg, r) for r in rates])
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        if not self.pos_embed.is_meta:  # on the meta device (loaders) weights come from a file anyway
            self.init_weights()

    # -- init (as the original: trunc-normal 0.02 for pos/linears, 1e-6 normal for tokens) --
    def init_weights(self) -> None:
        """Initialise as DINOv2 does: truncated-normal position embedding and Linear weights, tiny CLS/register
        tokens, zero Linear biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- tokens --
    def interpolate_pos_encoding(self, n_tokens: int, h: int, w: int, dtype: torch.dtype | None = None) -> Tensor:
        """Position embedding for an h x w input (pixels), cast to `dtype` (the token dtype, as the original)."""
        if n_tokens - 1 == self.pos_embed.shape[1] - 1 and h == w:
            return self.pos_embed
        grid = resize_pos_embed(
            self.pos_embed, (h // self.patch_size, w // self.patch_size),
            self.cfg.interpolate_offset, self.cfg.interpolate_antialias,
        )
        return grid.to(dtype or self.pos_embed.dtype)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images [B, 3, H, W] -> tokens [B, 1 + registers + patches, D]: patch embedding (masked patches replaced
        by the mask token), CLS, position embedding interpolated to the input size, registers."""
        b, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1], h, w, x.dtype)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]), dim=1)
        return x

    # -- outputs --
    def forward_features(
        self, x: Tensor, masks: Tensor | None = None, return_attention: bool = False
    ) -> dict[str, Tensor]:
        """Normed CLS, register and patch tokens (and the last block's softmax attention on request)."""
        x = self.prepare_tokens(x, masks)
        attn = None
        for i, blk in enumerate(self.blocks):
            if return_attention and i == len(self.blocks) - 1:
                x, attn = blk(x, return_attention=True)
            else:
                x = blk(x)
        xn = self.norm(x)
        r = self.num_register_tokens
        out = {
            "x_norm_clstoken": xn[:, 0],
            "x_norm_regtokens": xn[:, 1 : r + 1],
            "x_norm_patchtokens": xn[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }
        if attn is not None:
            out["attention"] = attn
        return out

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """For each of the last `n` blocks (or the given block indices), ascending: patch tokens
        [B, N, D] (and the CLS token [B, D] when `return_class_token`), each through the final norm."""
        b, _, h, w = x.shape
        depth = len(self.blocks)
        take = set(range(depth - n, depth)) if isinstance(n, int) else set(n)
        if not take or min(take) < 0 or max(take) >= depth:
            raise ValueError(f"cannot take blocks {sorted(take)} of a {depth}-block model")
        x = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in take:
                outputs.append(x)
        if norm:
            outputs = [self.norm(o) for o in outputs]
        cls_tokens = [o[:, 0] for o in outputs]
        patches = [o[:, 1 + self.num_register_tokens :] for o in outputs]
        if reshape:
            p = self.patch_size
            patches = [o.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in patches]
        if return_class_token:
            return tuple(zip(patches, cls_tokens))
        return tuple(patches)

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> the normalised CLS token [B, D]."""
        return self.forward_features(x)["x_norm_clstoken"]
