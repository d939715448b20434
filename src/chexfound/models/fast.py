"""CPU inference fast path: blocks whose Linear layers run as oneDNN GEMMs on pre-packed weights.

On this project's CPUs plain `F.linear` goes to MKL sgemm with the weight re-laid-out on every call;
oneDNN with weights packed once (what torch.compile's freezing pass does, without its minutes of compile
time) is ~20-30% faster per GEMM. On top of that each residual branch is folded into its GEMM:
LayerScale gamma is multiplied into the output projection's weight and bias once, and the residual add
runs as the GEMM's fused "add" post-op, removing two full passes over the token tensor per branch.

`pack_for_inference(model)` returns a copy for inference only (no autograd; don't save its state_dict).
Outputs equal the plain model's to fp32 rounding (~1e-6); with dtype=torch.bfloat16 the GEMMs and
attention run in bf16 and LayerNorm/residual stream stay fp32, as under CPU autocast.
When the oneDNN ops are missing (another build), the model is returned unchanged.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chexfound.models import vit as _vit
from chexfound.models.vit import Block, SwiGLU, VisionTransformer

log = logging.getLogger(__name__)


def packing_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and ops is not None
                    and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))
    except (RuntimeError, AttributeError):
        return False


class _PackedLinear:
    """A Linear's weight packed once for oneDNN (optionally scaled per output row, i.e. LayerScale folded)."""

    def __init__(self, lin: nn.Linear, dtype: torch.dtype, rows_hint: int, scale: Tensor | None = None) -> None:
        w = lin.weight.detach().float()
        b = lin.bias.detach().float() if lin.bias is not None else torch.zeros(w.shape[0])
        if scale is not None:
            s = scale.detach().float()
            w, b = w * s[:, None], b * s
        self.dtype = dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype).contiguous(), rows_hint)
        self.bias = b.to(dtype).contiguous()

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        x = x.to(self.dtype)
        if residual is not None and residual.dtype == self.dtype:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return y if residual is None else residual + y


class PackedBlock(nn.Module):
    """Inference-only twin of a Block: same maths, packed GEMMs, LayerScale folded, residual adds fused."""

    def __init__(self, blk: Block, dtype: torch.dtype, rows_hint: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = blk.norm1, blk.norm2
        self.num_heads = blk.attn.num_heads
        self.scale = blk.attn.scale
        g1 = blk.ls1.gamma if hasattr(blk.ls1, "gamma") else None
        g2 = blk.ls2.gamma if hasattr(blk.ls2, "gamma") else None
        self.qkv = _PackedLinear(blk.attn.qkv, dtype, rows_hint)
        self.proj = _PackedLinear(blk.attn.proj, dtype, rows_hint, g1)
        self.swiglu = isinstance(blk.mlp, SwiGLU)
        if self.swiglu:
            self.fc_in = _PackedLinear(blk.mlp.w12, dtype, rows_hint)
            self.fc_out = _PackedLinear(blk.mlp.w3, dtype, rows_hint, g2)
        else:
            self.fc_in = _PackedLinear(blk.mlp.fc1, dtype, rows_hint)
            self.fc_out = _PackedLinear(blk.mlp.fc2, dtype, rows_hint, g2)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if torch.is_grad_enabled():
            raise RuntimeError("a packed model is for inference only: run it under torch.inference_mode()")
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = None
        if return_attention or not _vit._FUSED_ATTENTION:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            o = attn @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(o.transpose(1, 2).reshape(b, n, c), residual=x)
        h = self.fc_in(self.norm2(x))
        if self.swiglu:
            h1, h2 = h.chunk(2, dim=-1)
            h = F.silu(h1) * h2
        else:
            h = F.gelu(h)
        x = self.fc_out(h, residual=x)
        return (x, attn) if return_attention else x


def pack_for_inference(model: VisionTransformer, dtype: torch.dtype = torch.float32,
                       rows_hint: int | None = None) -> VisionTransformer:
    """A CPU inference copy of `model` with packed blocks (see module doc); unchanged if unsupported."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"pack dtype must be float32 or bfloat16, not {dtype}")
    if not packing_available() or next(model.parameters()).device.type != "cpu":
        log.info("oneDNN weight packing unavailable here; using the plain model")
        return model
    rows = rows_hint or (1 + model.num_register_tokens + model.cfg.num_patches)
    fast = copy.deepcopy(model).eval()
    fast.blocks = nn.ModuleList([PackedBlock(b, dtype, rows) for b in fast.blocks])  # type: ignore[arg-type]
    fast.requires_grad_(False)
    fast.packed_dtype = dtype  # type: ignore[assignment]
    return fast
