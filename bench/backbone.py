"""Backbone forward throughput on this machine: ours vs a plain-PyTorch reference, fp32 and bf16.

The reference is the original DINOv2/CheXFound block as it runs without xFormers: fused qkv Linear,
explicit `softmax(q k^T * scale) v` attention, LayerScale multiply, GELU MLP or packed SwiGLU, under
torch.no_grad(). Ours is chexfound.models.VisionTransformer (SDPA attention) under torch.inference_mode().
Both get identical weights and inputs in the same process, and runs alternate so machine load hits both.

Prints images/s for ViT-S/16 at 224 and ViT-L/16 at 512 (CheXFound), the ratio ours / reference, and for
bf16 the achieved FLOP rate as a share of this machine's bf16 matmul peak (measured here, same process).

    python bench/backbone.py            # default: a few minutes on 2 cores
    python bench/backbone.py --quick    # ViT-S only
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chexfound.models import VisionTransformer, create_backbone  # noqa: E402
from chexfound.models.config import ViTConfig  # noqa: E402
from chexfound.models.vit import swiglu_hidden  # noqa: E402


# ---------------------------------------------------------------- reference (the original's fallback path)
class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefSwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class RefLayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class RefBlock(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = RefAttention(d, cfg.num_heads)
        self.ls1, self.ls2 = RefLayerScale(d), RefLayerScale(d)
        self.mlp = (RefSwiGLU(d, swiglu_hidden(d, cfg.mlp_ratio)) if cfg.ffn_layer == "swiglu"
                    else RefMlp(d, int(d * cfg.mlp_ratio)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RefViT(nn.Module):
    """Same parameter names as ours (LayerScale required), so `load_state_dict` shares the weights."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d, p = cfg.embed_dim, cfg.patch_size
        self.cfg = cfg
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, p, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d)) if cfg.num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.blocks = nn.ModuleList([RefBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def get_intermediate_layers(self, x: Tensor, n: int) -> list[tuple[Tensor, Tensor]]:
        b = x.shape[0]
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1) + self.pos_embed  # native size only
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]), dim=1)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                outs.append(x)
        r = 1 + self.cfg.num_register_tokens
        return [(o[:, r:], o[:, 0]) for o in map(self.norm, outs)]


# ---------------------------------------------------------------- timing
def time_fn(fn: Callable[[], object], iters: int, warmup: int = 1) -> float:
    """Best (least disturbed) seconds per call."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def vit_flops(cfg: ViTConfig, size: int) -> float:
    """Multiply-adds x 2 of one image's forward (matmuls only)."""
    d, p = cfg.embed_dim, cfg.patch_size
    g = (size // p) ** 2
    n = 1 + cfg.num_register_tokens + g
    ffn = 3 * d * swiglu_hidden(d, cfg.mlp_ratio) if cfg.ffn_layer == "swiglu" else 2 * d * int(d * cfg.mlp_ratio)
    per_block = n * (4 * d * d + ffn) + 2 * n * n * d
    return 2.0 * (cfg.depth * per_block + g * 3 * p * p * d)


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best, t_end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
