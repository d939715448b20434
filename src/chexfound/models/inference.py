"""How a backbone runs for inference: one settings object (`InferenceSettings`) and one function
(`prepare_backbone`) used by the feature engine (`chexfound embed`, the adapt/evaluate token cache), so
those paths get the same fast kernels. `Predictor` (predict, serve, export) uses only `compile_blocks`
(its --compile) and its own autocast; it does not pack weights or capture CUDA graphs.

- CPU, `pack`: oneDNN GEMMs on pre-packed weights with LayerScale and the residual add folded in
  (`chexfound.models.fast`), fp32 or bf16. On by default on CPU (it pays there without compile time).
- `compile`: each transformer block through `torch.compile` with static shapes (one graph serves every
  block: same code, parameters are graph inputs). Pays on a GPU (fusion of LayerNorm / residual /
  SwiGLU with the GEMM epilogues); on the project's 2-core CPU it compiled for minutes and was no faster
  than the packed path, so it is off unless asked for.
- `cuda_graphs`: replay the whole forward from a captured CUDA graph at one fixed batch shape (the engine
  pads the last batch), removing per-kernel launch cost; CUDA only.
- `sdpa`: the scaled-dot-product-attention backends allowed ("auto" lets PyTorch choose; "flash",
  "cudnn", "efficient", "math" pin one, e.g. to compare them in `bench/gpu.py`).

All of these compute the same function: tests check packed and compiled outputs against eager on CPU.
"""

from __future__ import annotations

import copy
import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import Tensor, nn

from chexfound.models.extract import COMPUTE_DTYPES, autocast_for

log = logging.getLogger(__name__)
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


@dataclass(frozen=True)
class InferenceSettings:
    compute: str = "fp32"         # fp32 | bf16 | fp16 (autocast) | int8 (CPU: int8 Linears, chexfound.models.fast)
    pack: bool = True             # CPU: oneDNN packed weights (ignored on other devices)
    compile: bool = False         # per-block torch.compile, static shapes
    compile_mode: str = "default"  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    cuda_graphs: bool = False     # CUDA: capture the forward once per batch shape and replay it
    sdpa: str = "auto"            # auto | flash | cudnn | efficient | math

    def __post_init__(self) -> None:
        if self.compute not in COMPUTE_DTYPES and self.compute != "int8":
            raise ValueError(f"compute dtype {self.compute!r}: use one of {sorted(COMPUTE_DTYPES) + ['int8']}")
        if self.sdpa not in SDPA_BACKENDS:
            raise ValueError(f"sdpa backend {self.sdpa!r}: use one of {SDPA_BACKENDS}")

    @property
    def static_shapes(self) -> bool:
        """Whether batches should all have one shape (padded): compiled graphs and CUDA graphs are per shape."""
        return self.compile or self.cuda_graphs


def sdpa_context(backend: str) -> ContextManager[Any]:
    """Restrict scaled_dot_product_attention to one backend ("auto": no restriction)."""
    if backend == "auto":
        return ExitStack()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH, "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None)}
    if table[backend] is None:
        raise ValueError(f"this torch has no {backend} attention backend")
    return sdpa_kernel([table[backend]])


def run_context(device: torch.device, settings: InferenceSettings) -> Callable[[], ContextManager[Any]]:
    """A factory of the context every forward runs in: autocast for the compute dtype + the SDPA backend."""

    @contextmanager
    def ctx() -> Iterator[None]:
        amp = "fp32" if settings.compute == "int8" else settings.compute  # int8 Linears choose their own dtypes
        with autocast_for(device, amp), sdpa_context(settings.sdpa):
            yield

    return ctx


def compile_blocks(model: nn.Module, mode: str = "default") -> nn.Module:
    """A shallow copy of `model` whose blocks run through torch.compile (static shapes, whole-graph).
    Parameters are shared with `model`; only the block list differs."""
    fast = copy.copy(model)
    fast._modules = dict(model._modules)  # the copy gets its own module table (the blocks entry changes)
    fast.blocks = nn.ModuleList([torch.compile(b, dynamic=False, fullgraph=True, mode=mode)  # type: ignore[misc]
                                 for b in model.blocks])  # type: ignore[attr-defined]
    return fast


def prepare_backbone(model: nn.Module, device: torch.device | str, settings: InferenceSettings) -> nn.Module:
    """`model` moved to `device` in eval mode, with the fast path the settings and the device allow.
    The result is for inference only; `model` itself is left as it was (apart from the device move)."""
    from chexfound.models.vit import VisionTransformer

    dev = torch.device(device)
    model = model.to(dev).eval()
    if not isinstance(model, VisionTransformer):  # e.g. a wrapped or foreign module: run it as it is
        return model
    if settings.compute == "int8":  # one int8 path: the packed blocks' int8 GEMMs (CPU only)
        if dev.type != "cpu" or settings.compile:
            raise ValueError("int8 inference runs on the CPU, without --compile")
        from chexfound.models.fast import pack_for_inference

        return pack_for_inference(model, "int8")
    if settings.compile:
        if dev.type == "cpu":
            log.info("--compile on CPU: expect minutes of compilation; the packed path is usually as fast here")
        return compile_blocks(model, settings.compile_mode)
    if settings.pack and dev.type == "cpu" and settings.compute in ("fp32", "bf16"):
        from chexfound.models.fast import pack_for_inference

        return pack_for_inference(model, COMPUTE_DTYPES[settings.compute])
    return model


class CudaGraphForward:
    """`get_intermediate_layers` replayed from a CUDA graph captured at one input shape.

    The input is copied into a static buffer and the graph replayed; outputs live in the graph's memory
    pool and are overwritten by the next call, so callers copy them out (the engine moves them to the
    CPU) before calling again. Shapes other than the captured one fall back to the plain forward."""

    reuses_outputs = True  # the next call overwrites what the previous one returned

    def __init__(self, model: nn.Module, n_blocks: int, context: Callable[[], ContextManager[Any]]) -> None:
        self.model, self.n_blocks, self.context = model, n_blocks, context
        self._graph: Any = None
        self._shape: tuple[int, ...] | None = None
        self._static_in: Tensor | None = None
        self._static_out: Any = None

    def _capture(self, x: Tensor) -> None:
        self._static_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self.context():  # warm-up outside the graph (allocator, cuBLAS handles)
            for _ in range(2):
                self.model.get_intermediate_layers(self._static_in, n=self.n_blocks, return_class_token=True)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph), self.context():
            self._static_out = self.model.get_intermediate_layers(self._static_in, n=self.n_blocks,
                                                                  return_class_token=True)
        self._shape = tuple(x.shape)

    def __call__(self, x: Tensor) -> tuple[tuple[Tensor, Tensor], ...]:
        if x.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        # Streams and graphs belong to the current CUDA device: make it x's (e.g. cuda:1 without set_device).
        with torch.cuda.device(x.device):
            if self._graph is None:
                self._capture(x)
            if tuple(x.shape) != self._shape:
                with self.context():
                    return tuple(self.model.get_intermediate_layers(x, n=self.n_blocks, return_class_token=True))
            assert self._static_in is not None
            self._static_in.copy_(x)
            self._graph.replay()
            return tuple(self._static_out)
