"""Per-iteration schedules of DINOv2 (values identical to its array-based CosineScheduler), in closed form.

cosine(it): `freeze` iterations at 0, then a linear warm-up from `start` to `base` over `warmup` iterations
(numpy linspace: the last warm-up value is `base`), then a half cosine from `base` to `final` over the rest;
`final` after the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CosineSchedule:
    base: float
    final: float
    total: int
    warmup: int = 0
    start: float = 0.0
    freeze: int = 0

    def __call__(self, it: int) -> float:
        if it >= self.total:
            return self.final
        if it < self.freeze:
            return 0.0
        k = it - self.freeze
        if k < self.warmup:
            # numpy linspace(start, base, 1) == [start]
            return self.start if self.warmup == 1 else self.start + (self.base - self.start) * k / (self.warmup - 1)
        k -= self.warmup
        n = self.total - self.warmup - self.freeze
        return self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * k / n))


@dataclass(frozen=True)
class LinearWarmupConstant:
    """Teacher temperature: numpy linspace(start, value, warmup) then `value`."""

    start: float
    value: float
    warmup: int

    def __call__(self, it: int) -> float:
        if it < self.warmup:
            return self.start if self.warmup == 1 else self.start + (self.value - self.start) * it / (self.warmup - 1)
        return self.value


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """DINOv2: lr = base_lr * sqrt(B / 1024) (`sqrt_wrt_1024`)."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024.0)
    if rule == "linear_wrt_1024":
        return base_lr * global_batch / 1024.0
    return base_lr


@dataclass(frozen=True)
class Schedules:
    lr: CosineSchedule
    last_layer_lr: CosineSchedule
    wd: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: LinearWarmupConstant

    def at(self, it: int) -> dict[str, float]:
        return {"lr": self.lr(it), "last_layer_lr": self.last_layer_lr(it), "wd": self.wd(it),
                "momentum": self.momentum(it), "teacher_temp": self.teacher_temp(it)}


def _iterations(iterations: int | None, epochs: float, epoch_length: int) -> int:
    return int(iterations) if iterations is not None else int(round(epochs * epoch_length))


def build_schedules(cfg: dict[str, Any], lr: float, total: int, epoch_length: int) -> Schedules:
    o, t = cfg["optim"], cfg["teacher"]
    # Lengths in iterations, when given, win over lengths in epochs: they do not stretch or shrink when a
    # time budget refits the epoch, and stability depends on iterations (optimizer steps), not on epochs.
    warm = _iterations(o.get("warmup_iterations"), o["warmup_epochs"], epoch_length)
    freeze = _iterations(o.get("freeze_last_layer_iterations"), o["freeze_last_layer_epochs"], epoch_length)
    warm, freeze = min(warm, total), min(freeze, total)
    lr_s = CosineSchedule(lr, o["min_lr"], total, warmup=warm)
    # DINOv2 builds the last-layer schedule with the freeze prepended, so its cosine is shifted by `freeze`.
    ll = CosineSchedule(lr, o["min_lr"], total, warmup=min(warm, total - freeze), freeze=freeze)
    wd = CosineSchedule(o["weight_decay"], o["weight_decay_end"], total)
    mom = CosineSchedule(t["momentum_teacher"], t["final_momentum_teacher"], total)
    tt_warm = min(total, int(round(t["warmup_teacher_temp_epochs"] * epoch_length)))
    tt = LinearWarmupConstant(t["warmup_teacher_temp"], t["teacher_temp"], tt_warm)
    return Schedules(lr_s, ll, wd, mom, tt)
