"""Device and dtype names as the CLI spells them (`--device auto|cpu|cuda[:i]`, `--dtype fp32|bf16|fp16`)."""

from __future__ import annotations

import torch

from chexfound.errors import ConfigError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/"auto" -> cuda when available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ConfigError(None, f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return table[dtype]
