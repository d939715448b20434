"""Losses for every head task. Each takes logits with any leading dims (the grid trainer passes [G, B, C])
and targets [B, ...], and returns one loss per leading index (shape = logits.shape[:-2]).

Unlabelled entries (NaN targets) are masked out. Reductions are means over the labelled entries, not the
original's sums: with Adam the scale hardly matters, and a mean keeps learning rates independent of batch size
and class count.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ClassBalance = Literal["none", "pos_weight", "effective"]


def _masked_mean(loss: Tensor, mask: Tensor) -> Tensor:
    """Mean over the last two dims (batch, class) of the labelled entries."""
    return (loss * mask).sum(dim=(-2, -1)) / mask.sum().clamp(min=1)


def masked_bce(logits: Tensor, targets: Tensor, pos_weight: Tensor | None = None,
               class_weight: Tensor | None = None) -> Tensor:
    """Binary cross-entropy over labelled entries; `pos_weight`/`class_weight` are per class [C]."""
    mask = ~torch.isnan(targets)
    y = torch.nan_to_num(targets, nan=0.0).expand_as(logits)
    loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="none")
    if class_weight is not None:
        loss = loss * class_weight
    return _masked_mean(loss, mask.to(logits.dtype))


def asymmetric_loss(logits: Tensor, targets: Tensor, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
                    clip: float = 0.05, eps: float = 1e-8, class_weight: Tensor | None = None) -> Tensor:
    """ASL (Ridnik et al. 2021) as the original uses it: probability shifting of negatives by `clip`,
    focusing weights (1 - p_t)^gamma computed without gradient; masked mean instead of sum."""
    mask = ~torch.isnan(targets)
    y = torch.nan_to_num(targets, nan=0.0).expand_as(logits)
    p = torch.sigmoid(logits)
    p_neg = 1 - p
    if clip > 0:
        p_neg = (p_neg + clip).clamp(max=1)
    loss = y * torch.log(p.clamp(min=eps)) + (1 - y) * torch.log(p_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.no_grad():
            pt = p * y + p_neg * (1 - y)
            w = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
        loss = loss * w
    if class_weight is not None:
        loss = loss * class_weight
    return _masked_mean(-loss, mask.to(logits.dtype))


def masked_cross_entropy(logits: Tensor, targets: Tensor, class_weight: Tensor | None = None) -> Tensor:
    """Softmax CE; targets [B] class indices as floats, NaN = unlabelled."""
    t = targets.reshape(-1)
    mask = ~torch.isnan(t)
    idx = torch.nan_to_num(t, nan=0.0).long()
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, idx.view(*([1] * (logits.ndim - 2)), -1, 1).expand(*logits.shape[:-1], 1)).squeeze(-1)
    w = mask.to(logits.dtype)
    if class_weight is not None:
        w = w * class_weight[idx]
    return (nll * w).sum(-1) / w.sum().clamp(min=1e-12)


def masked_mse(logits: Tensor, targets: Tensor) -> Tensor:
    mask = ~torch.isnan(targets)
    y = torch.nan_to_num(targets, nan=0.0).expand_as(logits)
    return _masked_mean((logits - y) ** 2, mask.to(logits.dtype))


def cox_partial_likelihood(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood with Breslow's handling of ties, averaged over events:

        -(1/#events) * sum_{i: event_i} [ r_i - log sum_{j: t_j >= t_i} exp(r_j) ]

    `risk` [..., B] (log hazard ratio), `time`/`event` [B]; entries with NaN time or event are dropped.
    The risk set is the batch (as DeepSurv-style training does)."""
    keep = ~(torch.isnan(time) | torch.isnan(event))
    risk, time, event = risk[..., keep], time[keep], event[keep]
    if time.numel() == 0 or event.sum() == 0:
        return risk.sum(-1) * 0.0  # no events: no information, keep the graph
    order = torch.argsort(time, descending=True)
    r, t, e = risk[..., order], time[order], event[order]
    # log sum over {j: t_j >= t_i}: cumulative along decreasing time, taken at the last member of each tie group.
    lcse = torch.logcumsumexp(r, dim=-1)
    last = torch.searchsorted(-t, -t, right=True) - 1
    log_risk_set = lcse[..., last]
    return -((r - log_risk_set) * e).sum(-1) / e.sum()


def class_balance_weights(labels: np.ndarray, mode: ClassBalance, beta: float = 0.999,
                          max_pos_weight: float = 100.0) -> tuple[Tensor | None, Tensor | None]:
    """(pos_weight, class_weight) for a long-tailed multilabel set, from training labels [N, C] (NaN ignored).

    - "pos_weight": BCE positive weight n_neg / n_pos per class (clipped at `max_pos_weight`).
    - "effective": Cui et al. 2019 class-balanced weights (1 - beta) / (1 - beta^n_pos), normalised to mean 1.
    """
    if mode in ("none", None):
        return None, None
    y = np.asarray(labels, dtype=np.float64)
    pos = np.nansum(y == 1, axis=0).astype(np.float64)
    neg = np.nansum(y == 0, axis=0).astype(np.float64)
    if mode == "pos_weight":
        pw = np.clip(neg / np.maximum(pos, 1.0), 1.0 / max_pos_weight, max_pos_weight)
        return torch.tensor(pw, dtype=torch.float32), None
    if mode == "effective":
        eff = (1.0 - np.power(beta, np.maximum(pos, 1.0))) / (1.0 - beta)
        w = 1.0 / eff
        w = w / w.mean()
        return None, torch.tensor(w, dtype=torch.float32)
    raise ValueError(f"unknown class balance {mode!r}; use none, pos_weight or effective")


def multiclass_balance_weights(targets: np.ndarray, n_classes: int, mode: ClassBalance,
                               beta: float = 0.999) -> Tensor | None:
    """Per-class CE weights for multiclass targets [N] (inverse frequency or effective number)."""
    if mode in ("none", None):
        return None
    t = np.asarray(targets, dtype=np.float64).reshape(-1)
    counts = np.bincount(t[~np.isnan(t)].astype(int), minlength=n_classes).astype(np.float64)
    if mode == "pos_weight":
        w = 1.0 / np.maximum(counts, 1.0)
    elif mode == "effective":
        w = (1.0 - beta) / (1.0 - np.power(beta, np.maximum(counts, 1.0)))
    else:
        raise ValueError(f"unknown class balance {mode!r}")
    return torch.tensor(w / w.mean(), dtype=torch.float32)


LOSSES = {
    "multilabel": ("bce", "asl", "bce+asl"),
    "binary": ("bce", "asl", "bce+asl"),
    "multiclass": ("ce",),
    "regression": ("mse",),
    "survival": ("cox",),
}
DEFAULT_LOSS = {"multilabel": "bce", "binary": "bce", "multiclass": "ce", "regression": "mse", "survival": "cox"}


def build_loss(task: str, name: str | None, train_targets: np.ndarray, n_outputs: int,
               class_balance: ClassBalance = "none", asl: dict | None = None):
    """A callable (logits[..., B, K], targets[B, ...]) -> loss[...] for `task`.

    Targets: multilabel/binary [B, C] in {0, 1, NaN}; multiclass [B] class index or NaN; regression [B, K];
    survival [B, 2] = (time, event). "bce+asl" is the original's `--focal-loss` (BCE plus ASL)."""
    name = name or DEFAULT_LOSS[task]
    if name not in LOSSES[task]:
        raise ValueError(f"loss {name!r} does not fit task {task!r}; use one of {LOSSES[task]}")
    asl = dict(asl or {})

    if task in ("multilabel", "binary"):
        pos_weight, class_weight = class_balance_weights(train_targets, class_balance)

        def fn(logits: Tensor, y: Tensor) -> Tensor:
            pw = None if pos_weight is None else pos_weight.to(logits.device)
            cw = None if class_weight is None else class_weight.to(logits.device)
            y = y.reshape(y.shape[0], -1)
            out = 0.0
            if name in ("bce", "bce+asl"):
                out = out + masked_bce(logits, y, pos_weight=pw, class_weight=cw)
            if name in ("asl", "bce+asl"):
                out = out + asymmetric_loss(logits, y, class_weight=cw, **asl)
            return out  # type: ignore[return-value]

        return fn
    if task == "multiclass":
        cw_mc = multiclass_balance_weights(train_targets, n_outputs, class_balance)
        return lambda logits, y: masked_cross_entropy(logits, y, None if cw_mc is None else cw_mc.to(logits.device))
    if task == "regression":
        return lambda logits, y: masked_mse(logits, y.reshape(y.shape[0], -1))
    return lambda logits, y: cox_partial_likelihood(logits[..., 0], y[:, 0], y[:, 1])
