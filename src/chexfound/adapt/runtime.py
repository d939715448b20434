"""Dtype names as the CLI spells them (`--dtype fp32|bf16|fp16`); devices: chexfound.runio.resolve_device."""

from __future__ import annotations

import torch

from chexfound.errors import ConfigError


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
