"""An independent, formula-by-formula reference of the DINOv2/CheXFound ViT forward, written from the
published facts (reference notes §1), not from our model code. It reads weights from a state dict with
the original names and uses no torch.nn modules: explicit LayerNorm, explicit softmax attention, exact
GELU by erf, SiLU by sigmoid, patch embedding as a matrix product over unfolded patches, and bicubic
position-embedding resizing written out (cubic convolution a = -0.75, border-clamped taps, source
coordinate (dst + 0.5) / scale - 0.5 with the scale given by the offset kludge or by the sizes)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def softmax(s: Tensor) -> Tensor:
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def silu(x: Tensor) -> Tensor:
    return x / (1.0 + torch.exp(-x))


def linear(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def attention(x: Tensor, sd: dict[str, Tensor], pre: str, heads: int) -> tuple[Tensor, Tensor]:
    b, n, d = x.shape
    dh = d // heads
    qkv = linear(x, sd, f"{pre}.attn.qkv")  # [B, N, 3D]: rows of the weight are [q; k; v], heads contiguous
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, n, heads, dh).transpose(1, 2) for i in range(3))
    a = softmax((q @ k.transpose(-1, -2)) / math.sqrt(dh))
    o = (a @ v).transpose(1, 2).reshape(b, n, d)
    return linear(o, sd, f"{pre}.attn.proj"), a


def ffn(x: Tensor, sd: dict[str, Tensor], pre: str) -> Tensor:
    if f"{pre}.mlp.w12.weight" in sd:
        h = linear(x, sd, f"{pre}.mlp.w12")
        half = h.shape[-1] // 2
        return linear(silu(h[..., :half]) * h[..., half:], sd, f"{pre}.mlp.w3")
    return linear(gelu(linear(x, sd, f"{pre}.mlp.fc1")), sd, f"{pre}.mlp.fc2")


def block(x: Tensor, sd: dict[str, Tensor], i: int, heads: int, eps: float = 1e-6) -> Tensor:
    pre = f"blocks.{i}"
    g1 = sd.get(f"{pre}.ls1.gamma", torch.ones(()))
    g2 = sd.get(f"{pre}.ls2.gamma", torch.ones(()))
    a, _ = attention(layer_norm(x, sd[f"{pre}.norm1.weight"], sd[f"{pre}.norm1.bias"], eps), sd, pre, heads)
    x = x + g1 * a
    return x + g2 * ffn(layer_norm(x, sd[f"{pre}.norm2.weight"], sd[f"{pre}.norm2.bias"], eps), sd, pre)


def _cubic(t: Tensor, a: float = -0.75) -> Tensor:
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _resize_matrix(n_in: int, n_out: int, scale: float) -> Tensor:
    """[n_out, n_in] bicubic weights: output j samples input coordinate (j + 0.5) / scale - 0.5."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(n_out):
        src = (j + 0.5) / scale - 0.5
        f = math.floor(src)
        for tap in range(f - 1, f + 3):
            w[j, min(max(tap, 0), n_in - 1)] += float(_cubic(torch.tensor(src - tap, dtype=torch.float64)))
    return w


def resize_pos(pos: Tensor, rows: int, cols: int, offset: float) -> Tensor:
    """[1, 1 + M*M, D] -> [1, 1 + rows*cols, D]; scale (rows + offset) / M with an offset, else rows / M."""
    m = math.isqrt(pos.shape[1] - 1)
    sr = (rows + offset) / m if offset else rows / m
    sc = (cols + offset) / m if offset else cols / m
    grid = pos[0, 1:].double().reshape(m, m, -1)
    out = torch.einsum("im,jn,mnd->ijd", _resize_matrix(m, rows, sr), _resize_matrix(m, cols, sc), grid)
    return torch.cat([pos[:, :1].double(), out.reshape(1, rows * cols, -1)], dim=1).to(pos.dtype)


def prepare_tokens(x: Tensor, sd: dict[str, Tensor], patch: int, offset: float) -> Tensor:
    b, c, h, w = x.shape
    r, q = h // patch, w // patch
    cols = x.reshape(b, c, r, patch, q, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, r * q, c * patch * patch)
    wt = sd["patch_embed.proj.weight"]
    tok = cols @ wt.reshape(wt.shape[0], -1).T + sd["patch_embed.proj.bias"]
    tok = torch.cat([sd["cls_token"].expand(b, -1, -1), tok], dim=1)
    pos = sd["pos_embed"]
    if pos.shape[1] != tok.shape[1] or h != w:
        pos = resize_pos(pos, r, q, offset)
    tok = tok + pos
    if "register_tokens" in sd:  # after CLS, no position embedding
        tok = torch.cat([tok[:, :1], sd["register_tokens"].expand(b, -1, -1), tok[:, 1:]], dim=1)
    return tok


def intermediate_layers(x: Tensor, sd: dict[str, Tensor], heads: int, patch: int, n: int, offset: float,
                        eps: float = 1e-6) -> list[tuple[Tensor, Tensor]]:
    """For each of the last n blocks, ascending: (normed patch tokens, normed CLS)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    t = prepare_tokens(x, sd, patch, offset)
    out = []
    for i in range(depth):
        t = block(t, sd, i, heads, eps)
        if i >= depth - n:
            tn = layer_norm(t, sd["norm.weight"], sd["norm.bias"], eps)
            out.append((tn[:, 1 + regs:], tn[:, 0]))
    return out
