"""Uncertain labels (-1 in a manifest): the one table of what each policy turns them into.

    "nan"   ignored (NaN: the label does not count, as if unlabelled) - the default
    "zero"  negative (CheXpert's U-Zeros)
    "one"   positive (CheXpert's U-Ones)

Used by `Manifest.labels`, the head fitters (`chexfound.adapt.fit`) and the evaluation tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Union

import numpy as np

__all__ = ["UNCERTAIN", "UNCERTAIN_POLICIES", "UncertainPolicy", "UncertainSpec", "resolve_uncertain",
           "uncertain_fill"]

UncertainPolicy = Literal["nan", "zero", "one"]
UncertainSpec = Union[UncertainPolicy, Mapping[str, UncertainPolicy]]
UNCERTAIN = -1.0  # how a manifest writes "uncertain"
_FILL: dict[str, float] = {"nan": float("nan"), "zero": 0.0, "one": 1.0}
UNCERTAIN_POLICIES: tuple[str, ...] = tuple(_FILL)


def uncertain_fill(policy: str) -> float:
    """The value an uncertain label takes under `policy`; ValueError naming the policies for anything else."""
    if policy not in _FILL:
        raise ValueError(f"unknown uncertain-label policy {policy!r}; use one of {', '.join(UNCERTAIN_POLICIES)}")
    return _FILL[policy]


def resolve_uncertain(labels: np.ndarray, policy: str, dtype: type | np.dtype = np.float32) -> np.ndarray:
    """A copy of `labels` (as `dtype`) with every -1 replaced as `policy` says; other values are kept."""
    fill = uncertain_fill(policy)
    y = np.array(labels, dtype=dtype, copy=True)
    y[y == UNCERTAIN] = fill
    return y
