"""GLoRI: one query per finding cross-attending over the patch tokens of the last n blocks.

The released head (CheXFound `glori.pth`) is an ML-Decoder with an optional global-CLS concatenation:

    memory = ReLU(Linear(cat_blocks(patch tokens)))              [B, N, d]
    tgt    = queries (one per class; frozen N(0,1) or learned)   [C, d]
    tgt    = norm1(tgt + dropout(tgt))                           (the original's quirk, kept: it matters in training)
    a, w   = MultiheadAttention(tgt, memory, memory)             w: per-head weights [B, heads, C, N]
    tgt    = norm2(tgt + dropout(a))
    tgt    = norm3(tgt + dropout(linear2(dropout(relu(linear1(tgt))))))
    h_c    = [cat_blocks(cls) ; tgt_c]  if cat_cls else tgt_c
    logit_c = <h_c, W_c> + b_c                                   (group FC as one einsum)

The attention is written out with nn.MultiheadAttention's parameter layout and arithmetic (packed
`in_proj_weight` rows [q; k; v], q scaled by head_dim**-0.5, softmax, dropout on the weights, `out_proj`) so
that the grid trainer can `vmap` many heads; tests check it against torch.nn.MultiheadAttention.

Coarse features (optional, `coarse_pools=(2, 4, 8)`): our concrete version of the paper's "coarse-grained
local features" (the paper's exact equations are not public). The concatenated patch grid is average-pooled
with k x k windows for each k; pooled tokens go through the same embedding + ReLU, get a learned per-level
embedding (zero init), and are appended to the memory. The queries attend over fine + coarse tokens in one
softmax. The returned attention stays [B, heads, C, N_fine]: each coarse token's weight is spread evenly over
the k*k fine patches it pools, so every map still sums to 1 over the image.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chexfound.adapt.heads.base import Features, Head


class CrossAttention(nn.Module):
    """nn.MultiheadAttention's parameters and math, batch-first, returning per-head weights."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.dropout = num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        # As nn.MultiheadAttention._reset_parameters.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        b, lq, d = query.shape
        h = self.num_heads
        hd = d // h
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, wq, bq).reshape(b, lq, h, hd).transpose(1, 2)
        k = F.linear(memory, wk, bk).reshape(b, -1, h, hd).transpose(1, 2)
        v = F.linear(memory, wv, bv).reshape(b, -1, h, hd).transpose(1, 2)
        weights = ((q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)).softmax(dim=-1)
        # MultiheadAttention drops attention weights and returns the dropped ones (no-op in eval).
        weights = F.dropout(weights, self.dropout, self.training)
        out = (weights @ v).transpose(1, 2).reshape(b, lq, d)
        return self.out_proj(out), weights


class DecoderLayer(nn.Module):
    """ML-Decoder's TransformerDecoderLayerOptimal: no self-attention; names as the released checkpoint."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.p = dropout
        self.multihead_attn = CrossAttention(dim, num_heads, dropout)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def forward(self, tgt: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        tgt = self.norm1(tgt + self._drop(tgt))
        attn_out, weights = self.multihead_attn(tgt, memory)
        tgt = self.norm2(tgt + self._drop(attn_out))
        ffn = self.linear2(self._drop(F.relu(self.linear1(tgt))))
        tgt = self.norm3(tgt + self._drop(ffn))
        return tgt, weights


class GloriHead(Head):
    """GLoRI: one query per finding attending over the patch tokens of the last blocks, joined with the global CLS
    features (the CheXFound head; loads the released glori.pth)."""
    head_type = "glori"
    needs_tokens = True

    def __init__(self, findings: Sequence[str], n_blocks: int, task: str = "multilabel", embed_dim: int = 1024,
                 decoder_dim: int = 768, num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1,
                 cat_cls: bool = False, learn_queries: bool = False, coarse_pools: Sequence[int] = (),
                 grid: Sequence[int] | None = None) -> None:
        super().__init__(findings, n_blocks, task)
        self.embed_dim, self.decoder_dim, self.num_heads = embed_dim, decoder_dim, num_heads
        self.ffn_dim, self.dropout, self.cat_cls, self.learn_queries = ffn_dim, dropout, cat_cls, learn_queries
        self.coarse_pools = [int(k) for k in coarse_pools]
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        if any(k < 2 for k in self.coarse_pools):
            raise ValueError(f"coarse pooling windows must be >= 2, got {self.coarse_pools}")
        in_dim = embed_dim * n_blocks
        self.embed = nn.Linear(in_dim, decoder_dim)
        # nn.Embedding's default init: N(0, 1). Frozen queries are a buffer so they are saved but never trained.
        queries = torch.randn(self.out_dim, decoder_dim)
        if learn_queries:
            self.queries = nn.Parameter(queries)
        else:
            self.register_buffer("queries", queries)
        if self.coarse_pools:
            self.level_embed = nn.Parameter(torch.zeros(len(self.coarse_pools), decoder_dim))
        self.layer = DecoderLayer(decoder_dim, num_heads, ffn_dim, dropout)
        fc_in = decoder_dim + (in_dim if cat_cls else 0)
        # ML-Decoder's GroupFC: xavier-normal on a (C, fc_in, 1) tensor -> std sqrt(2 / (fc_in + C)).
        self.class_weight = nn.Parameter(torch.randn(self.out_dim, fc_in) * math.sqrt(2.0 / (fc_in + self.out_dim)))
        self.class_bias = nn.Parameter(torch.zeros(self.out_dim))

    @property
    def has_attention(self) -> bool:
        """GLoRI returns one attention map per finding (what heatmaps show)."""
        return True

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments beyond findings/blocks/task: what a head file records to rebuild it."""
        return {"embed_dim": self.embed_dim, "decoder_dim": self.decoder_dim, "num_heads": self.num_heads,
                "ffn_dim": self.ffn_dim, "dropout": self.dropout, "cat_cls": self.cat_cls,
                "learn_queries": self.learn_queries, "coarse_pools": list(self.coarse_pools),
                "grid": None if self.grid is None else list(self.grid)}

    def _grid(self, n: int) -> tuple[int, int]:
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != n:
                raise ValueError(f"{n} patch tokens do not fill the configured {self.grid} grid")
            return self.grid
        s = math.isqrt(n)
        if s * s != n:
            raise ValueError(f"{n} patch tokens are not a square grid; pass grid=(h, w) to the GLoRI head")
        return s, s

    def _coarse(self, x: Tensor) -> list[Tensor]:
        """Average-pooled patch grids, one token set per window size: [B, N/k^2, in_dim] each."""
        b, n, c = x.shape
        gh, gw = self._grid(n)
        img = x.transpose(1, 2).reshape(b, c, gh, gw)
        out = []
        for k in self.coarse_pools:
            if gh % k or gw % k:
                raise ValueError(f"coarse pooling window {k} does not divide the {gh}x{gw} patch grid")
            out.append(F.avg_pool2d(img, k).flatten(2).transpose(1, 2))
        return out

    def _fold_attention(self, w: Tensor, n: int) -> Tensor:
        """[B, H, C, N + coarse] -> [B, H, C, N]: coarse weights spread evenly over their k*k fine patches."""
        gh, gw = self._grid(n)
        fine, start = w[..., :n], n
        for k in self.coarse_pools:
            m = (gh // k) * (gw // k)
            a, c = gh // k, gw // k
            part = w[..., start : start + m].reshape(*w.shape[:-1], a, 1, c, 1)
            # expand + reshape rather than repeat_interleave: the latter exports to ONNX with the traced batch
            # size baked in.
            part = part.expand(*w.shape[:-1], a, k, c, k).reshape(*w.shape[:-1], n) / (k * k)
            fine = fine + part
            start += m
        return fine

    def forward(self, features: Features) -> tuple[Tensor, Tensor]:
        """Features of the last `n_blocks` blocks -> (logits [B, C], attention [B, C, gh, gw]): one query per
        finding attends over the concatenated patch tokens, joined with the CLS tokens."""
        feats = list(features)[-self.n_blocks :]
        if len(feats) != self.n_blocks:
            raise ValueError(f"GLoRI head needs {self.n_blocks} blocks of features, got {len(feats)}")
        x = torch.cat([p for p, _ in feats], dim=-1).float()
        b, n, _ = x.shape
        memory = F.relu(self.embed(x))
        if self.coarse_pools:
            levels = [F.relu(self.embed(t)) + self.level_embed[i] for i, t in enumerate(self._coarse(x))]
            memory = torch.cat([memory, *levels], dim=1)
        tgt = self.queries.unsqueeze(0).expand(b, -1, -1)
        h, weights = self.layer(tgt, memory)
        if self.cat_cls:
            g = torch.cat([c for _, c in feats], dim=-1).float()
            h = torch.cat([g.unsqueeze(1).expand(-1, h.shape[1], -1), h], dim=-1)
        logits = torch.einsum("bcd,cd->bc", h, self.class_weight) + self.class_bias
        if self.coarse_pools:
            weights = self._fold_attention(weights, n)
        return logits, weights
