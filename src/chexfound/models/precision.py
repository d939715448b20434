"""Inference precision as a user choice (`--precision fp32|bf16|int8`) and the check that it pays here.

- fp32: the reference; runs anywhere.
- bf16: GEMMs and attention in bfloat16, LayerNorm and the residual stream in fp32 (`chexfound.models.fast`).
  On a CPU it is fast only with native bf16 dot products (x86: AVX512_BF16 or AMX-BF16; Arm: BF16);
  without them oneDNN emulates bf16 and is slower than fp32. On CUDA it needs a bf16-capable GPU.
- int8: every transformer Linear as an int8 x int8 -> int32 GEMM (`torch._int_mm`), weights quantized once
  per output channel, activations per token at run time (dynamic, symmetric); attention in bf16 where the
  CPU has it, else fp32. Fast only with int8 dot-product instructions (x86: AVX512_VNNI, AVX-VNNI or
  AMX-INT8; Arm: the dot-product extension, `asimddp`). CPU only.

`check_precision` refuses a precision the device cannot run fast, naming the missing instructions, rather
than running it silently slower; `allow_slow=True` (`--allow-slow-precision`) runs it anyway.
"""

from __future__ import annotations

import platform
from functools import lru_cache

import torch

from chexfound.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "int8")

# Any one of these CPU flags (as /proc/cpuinfo spells them) makes the precision fast.
_X86_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "int8": ("avx512_vnni", "avx_vnni", "amx_int8")}
_ARM_FLAGS = {"bf16": ("bf16",), "int8": ("asimddp",)}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (Linux); empty when they cannot be read."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 | Arm
            flags.update(value.split())
    return frozenset(flags)


def required_flags(precision: str) -> tuple[str, ...]:
    """The CPU flags of which one makes `precision` fast here (empty for fp32)."""
    if precision == "fp32":
        return ()
    arm = platform.machine().lower() in ("aarch64", "arm64")
    return (_ARM_FLAGS if arm else _X86_FLAGS)[precision]


def missing_cpu_support(precision: str, flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """() when this CPU runs `precision` fast, else the flags it would need (any one of them)."""
    need = required_flags(precision)
    have = cpu_flags() if flags is None else flags
    if not need or any(f in have for f in need):
        return ()
    return need


def check_precision(precision: str, device: torch.device | str = "cpu", allow_slow: bool = False) -> str:
    """`precision` if `device` runs it fast; else a ConfigError naming what is missing (or, with
    `allow_slow`, `precision` all the same)."""
    if precision not in PRECISIONS:
        raise ConfigError(None, f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    if precision == "fp32":
        return precision
    if dev.type == "cuda":
        if precision == "int8":
            raise ConfigError(None, "--precision int8 runs on the CPU only (int8 GEMMs with dynamic activation "
                                    "quantization); on a GPU use bf16")
        if not allow_slow and not torch.cuda.is_bf16_supported():
            raise ConfigError(None, f"--precision bf16: {torch.cuda.get_device_name(dev)} has no native bf16; "
                                    "use fp32 (or --allow-slow-precision)")
        return precision
    if dev.type != "cpu":
        raise ConfigError(None, f"--precision {precision} is supported on cpu and cuda, not {dev.type}")
    missing = missing_cpu_support(precision)
    if missing and not allow_slow:
        what = "int8 dot-product" if precision == "int8" else "bf16"
        raise ConfigError(None, f"--precision {precision}: this CPU ({platform.processor() or platform.machine()}) "
                                f"lacks the {what} instructions that make it faster than fp32 (needs one of: "
                                f"{', '.join(missing)}; see /proc/cpuinfo flags). It would run slower than "
                                "fp32: use --precision fp32, or --allow-slow-precision to run it anyway")
    return precision
