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

bf16 needs two more things, found with a CPU-time profile (one thread, `time.thread_time`, so other jobs on
the machine do not distort it; bench/backbone.py prints it):
- attention. PyTorch's CPU flash-attention kernel runs bf16 at ~85 GFLOP/s here (the bf16 GEMM peak is
  ~470 GFLOP/s per core), so for ViT-L/16-512 (1,029 tokens) the 14% of FLOPs in attention took about half
  the time. Plain bf16 GEMMs (scores, then scores @ v) in query chunks whose score tile stays in cache
  (~4 MB: 128 queries x 16 heads x 1,029 keys) run at ~165 GFLOP/s; the whole softmax row is in each tile,
  so this is exact attention, not an online-softmax approximation. In fp32 the flash kernel is the faster
  one and stays.
- GELU (ViT-S/B/L with an MLP) runs as the first GEMM's fused post-op instead of a separate pass.

int8 (`pack_for_inference(model, "int8")`, `--precision int8`): every block Linear as `torch._int_mm` (int8 x
int8 -> int32; oneDNN's VNNI kernels on x86), weights quantized once per output channel (symmetric, LayerScale
folded in first), activations per token at run time (symmetric, dynamic: no calibration). Attention runs in
bf16 as above where the CPU has bf16, else fp32 SDPA. Chosen by measurement on the project's CPU (one thread,
a ViT-L MLP GEMM, 1,029 x 1,024 x 4,096): packed fp32 81 ms; `torch._int_mm` 20 ms (28.7 ms with the
activation quantization), 1.1% relative error; the fbgemm `quantized::linear_dynamic` op 26 ms but 1.4% (per
tensor activations) and its weights must be built as quantized tensors, deprecated in this torch; oneDNN's
`qlinear_pointwise` did not return. `torch._int_mm` is the kernel torchao's dynamic int8 path runs on.
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

    def __call__(self, x: Tensor, residual: Tensor | None = None, post: str = "none") -> Tensor:
        """x @ W^T + b, then `post` ("none" | "gelu", erf GELU fused into the GEMM), then + residual."""
        x = x.to(self.dtype)
        if residual is not None and residual.dtype == self.dtype and post == "none":
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, post, [], "none" if post == "gelu" else "")
        return y if residual is None else residual + y


class _Int8Linear:
    """A Linear as an int8 GEMM: weights int8 per output row (scale folded first), activations quantized per
    token on each call. Same call signature as `_PackedLinear`; returns fp32."""

    def __init__(self, lin: nn.Linear, scale: Tensor | None = None) -> None:
        w = lin.weight.detach().float()
        b = lin.bias.detach().float() if lin.bias is not None else torch.zeros(w.shape[0])
        if scale is not None:
            s = scale.detach().float()
            w, b = w * s[:, None], b * s
        self.w_scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        self.weight_t = torch.round(w / self.w_scale[:, None]).clamp_(-127, 127).to(torch.int8).t()  # [in, out]
        self.bias = b.contiguous()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight_t, self.w_scale, self.bias))

    def __call__(self, x: Tensor, residual: Tensor | None = None, post: str = "none",
                 consume: bool = False) -> Tensor:
        """`consume=True`: `x` is a temporary the caller no longer needs (quantized in place when fp32)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        # Measured (one thread, 1,029 x 4,096): max|x| from amax and amin plus in-place scaling 2.0 ms; with
        # x.abs() and x / s, 10.9 ms (each new full-size tensor is fresh memory, page faults included).
        s = torch.maximum(x2.amax(dim=1, keepdim=True), x2.amin(dim=1, keepdim=True).neg_()).float()
        s = s.clamp_min_(1e-12).div_(127)
        x2 = x2 if consume and x2.dtype == torch.float32 else x2.to(torch.float32, copy=True)
        xq = x2.mul_(s.reciprocal()).round_().to(torch.int8)
        y = torch._int_mm(xq, self.weight_t).float().mul_(s).mul_(self.w_scale).add_(self.bias)
        if post == "gelu":
            y = F.gelu(y)
        y = y.view(*lead, y.shape[-1])
        return y if residual is None else y.add_(residual)


# Score tiles of query-chunked attention are kept near this size (bytes), so they stay in the caches.
_SCORE_TILE_BYTES = 4 << 20


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v for [B, H, N, d] tensors, image by image and in query chunks, on plain GEMMs.
    Exact attention (every softmax row is complete in its chunk); faster than the CPU flash kernel in bf16.
    Returns [B, N, H * d], the layout the output projection reads (no transpose copy afterwards)."""
    b, h, n, d = q.shape
    rows = max(16, min(n, _SCORE_TILE_BYTES // max(1, h * k.shape[-2] * q.element_size())) // 16 * 16)
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    for i in range(b):
        kt = k[i].transpose(-2, -1).contiguous()  # [H, d, N]: the score GEMM reads it row-major
        qi, vi = q[i] * scale, v[i].contiguous()  # contiguous once, not once per chunk inside matmul
        for s in range(0, n, rows):
            scores = torch.matmul(qi[:, s : s + rows], kt).softmax(dim=-1)
            out[i, s : s + rows] = torch.matmul(scores, vi).transpose(0, 1)
    return out.view(b, n, h * d)


class PackedBlock(nn.Module):
    """Inference-only twin of a Block: same maths, packed GEMMs, LayerScale folded, residual adds fused."""

    def __init__(self, blk: Block, dtype: torch.dtype, rows_hint: int, int8: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = copy.deepcopy(blk.norm1), copy.deepcopy(blk.norm2)  # the source stays as it was
        self.num_heads = blk.attn.num_heads
        self.scale = blk.attn.scale
        self.dtype = dtype  # the attention dtype (and, unless int8, the GEMMs')
        g1 = blk.ls1.gamma if hasattr(blk.ls1, "gamma") else None
        g2 = blk.ls2.gamma if hasattr(blk.ls2, "gamma") else None

        def linear(lin: nn.Linear, scale: Tensor | None = None) -> _PackedLinear | _Int8Linear:
            return _Int8Linear(lin, scale) if int8 else _PackedLinear(lin, dtype, rows_hint, scale)

        self._consume = {"consume": True} if int8 else {}  # int8 may quantize its (temporary) inputs in place
        self.qkv = linear(blk.attn.qkv)
        self.proj = linear(blk.attn.proj, g1)
        self.swiglu = isinstance(blk.mlp, SwiGLU)
        if self.swiglu:
            self.fc_in = linear(blk.mlp.w12)
            self.fc_out = linear(blk.mlp.w3, g2)
        else:
            self.fc_in = linear(blk.mlp.fc1)
            self.fc_out = linear(blk.mlp.fc2, g2)

    def nbytes(self) -> int:
        """Bytes of the weights this block holds (packed or int8 Linears, LayerNorms)."""
        lins = (self.qkv, self.proj, self.fc_in, self.fc_out)
        own = sum(p.numel() * p.element_size() for p in self.parameters())
        return own + sum(lin.nbytes() if isinstance(lin, _Int8Linear)
                         else lin.weight.numel() * lin.weight.element_size() + lin.bias.numel() * lin.bias.element_size()
                         for lin in lins)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if torch.is_grad_enabled():
            raise RuntimeError("a packed model is for inference only: run it under torch.inference_mode()")
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x), **self._consume)
        if qkv.dtype != self.dtype:  # int8 Linears return fp32: one cast of the contiguous output, not three
            qkv = qkv.to(self.dtype)
        qkv = qkv.view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = None
        if return_attention or not _vit._FUSED_ATTENTION:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            o = (attn @ v).transpose(1, 2).reshape(b, n, c)
        elif self.dtype == torch.bfloat16:
            o = chunked_attention(q.to(self.dtype), k.to(self.dtype), v.to(self.dtype), self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = self.proj(o, residual=x, **self._consume)
        if self.swiglu:
            h1, h2 = self.fc_in(self.norm2(x), **self._consume).chunk(2, dim=-1)
            h = F.silu(h1, inplace=True).mul_(h2)  # h1, h2 are views of a fresh GEMM output
        else:
            h = self.fc_in(self.norm2(x), post="gelu", **self._consume)
        x = self.fc_out(h, residual=x, **self._consume)
        return (x, attn) if return_attention else x


def pack_for_inference(model: VisionTransformer, dtype: torch.dtype | str = torch.float32,
                       rows_hint: int | None = None) -> VisionTransformer:
    """A CPU inference copy of `model` with packed blocks (see module doc); unchanged if unsupported.
    `dtype`: torch.float32 / torch.bfloat16, or "int8" (int8 Linears; attention in bf16 where the CPU has
    bf16 instructions, else fp32)."""
    int8 = dtype == "int8"
    if int8:
        from chexfound.models.precision import missing_cpu_support

        dtype = torch.float32 if missing_cpu_support("bf16") or not packing_available() else torch.bfloat16
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"pack dtype must be float32, bfloat16 or 'int8', not {dtype}")
    if next(model.parameters()).device.type != "cpu" or not (int8 or packing_available()):
        if int8:
            raise ValueError("int8 inference runs on the CPU only")
        log.info("oneDNN weight packing unavailable here; using the plain model")
        return model
    rows = rows_hint or (1 + model.num_register_tokens + model.cfg.num_patches)
    src = model
    model.blocks, blocks = nn.ModuleList(), model.blocks  # copy everything but the blocks (replaced below)
    try:
        fast = copy.deepcopy(model).eval()
    finally:
        model.blocks = blocks
    fast.blocks = nn.ModuleList([PackedBlock(b, dtype, rows, int8=int8)  # type: ignore[arg-type]
                                 for b in src.blocks])
    fast.requires_grad_(False)
    fast.packed_dtype = dtype  # type: ignore[assignment]
    fast.precision = "int8" if int8 else ("bf16" if dtype == torch.bfloat16 else "fp32")  # type: ignore[assignment]
    return fast


def inference_nbytes(model: nn.Module) -> int:
    """Bytes of the weights an inference model holds (packed and int8 blocks counted as stored)."""
    packed = [m for m in model.modules() if isinstance(m, PackedBlock)]
    inner = {id(p) for m in packed for p in m.parameters()}
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inner)
    rest += sum(b.numel() * b.element_size() for b in model.buffers())
    return rest + sum(m.nbytes() for m in packed)
