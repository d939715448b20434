"""An independent re-implementation of the original ML-Decoder/GLoRI forward (seq-first, torch's own
nn.MultiheadAttention, a per-class loop for the group FC), used only to check our head against it."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RefDecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d, heads, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d, eps=1e-5) for _ in range(3))
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(4))

    def forward(self, tgt: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        tgt = tgt + self.dropout1(tgt)
        tgt = self.norm1(tgt)
        tgt2, attn = self.multihead_attn(tgt, memory, memory, average_attn_weights=False)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(torch.relu(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout3(tgt2))
        return tgt, attn


class RefDecoder(nn.Module):
    """Parameter names as the released `decoder.` sub-module."""

    def __init__(self, n_cls: int, in_dim: int, d: int = 768, heads: int = 8, ffn: int = 2048,
                 cat_cls: bool = False) -> None:
        super().__init__()
        self.embed_standart = nn.Linear(in_dim, d)
        self.query_embed = nn.Embedding(n_cls, d)
        self.query_embed.requires_grad_(False)
        self.layers = nn.ModuleList([RefDecoderLayer(d, heads, ffn)])
        out = d + (in_dim if cat_cls else 0)
        self.duplicate_pooling = nn.Parameter(torch.empty(n_cls, out, 1))
        nn.init.xavier_normal_(self.duplicate_pooling)
        self.duplicate_pooling_bias = nn.Parameter(torch.randn(n_cls) * 0.1)
        self.cat_cls, self.n_cls = cat_cls, n_cls

    def forward(self, features, n: int = 4) -> tuple[Tensor, Tensor]:
        feats = features[-n:]
        x = torch.cat([f[0] for f in feats], dim=-1)
        mem = torch.relu(self.embed_standart(x)).transpose(0, 1)  # (N, B, d)
        tgt = self.query_embed.weight.unsqueeze(1).expand(-1, x.shape[0], -1)  # (C, B, d)
        h, attn = self.layers[0](tgt, mem)
        h = h.transpose(0, 1)  # (B, C, d)
        if self.cat_cls:
            g = torch.cat([f[1] for f in feats], dim=-1)
            h = torch.cat([g.unsqueeze(1).repeat(1, self.n_cls, 1), h], dim=-1)
        out = torch.zeros(h.shape[0], self.n_cls)
        for i in range(self.n_cls):
            out[:, i] = (h[:, i, :] @ self.duplicate_pooling[i]).squeeze(-1)
        return out + self.duplicate_pooling_bias, attn
