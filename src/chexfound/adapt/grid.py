"""Many heads of one architecture trained as one: parameters stacked along a leading "config" axis and the
forward vmapped (torch.func), so every batch of cached features is read once and fed to all learning-rate /
weight-decay configs together. AdamW runs on the stacked tensors with one lr and weight decay per config.

All configs start from the same initial weights (and the same frozen queries), so their differences come
from the hyper-parameters alone.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from chexfound.adapt.heads.base import Features, Head


class HeadGrid:
    def __init__(self, head: Head, lrs: Sequence[float], weight_decays: Sequence[float],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, chunk: int | None = None) -> None:
        if len(lrs) != len(weight_decays) or not len(lrs):
            raise ValueError("one weight decay per learning rate, at least one config")
        self.g = len(lrs)
        self.template = head
        heads = [copy.deepcopy(head) for _ in range(self.g)]
        params, buffers = stack_module_state(heads)
        self.params: dict[str, Tensor] = params
        self.buffers: dict[str, Tensor] = buffers
        dev = next(iter(params.values())).device
        self.lr = torch.tensor(list(lrs), dtype=torch.float32, device=dev)
        self.wd = torch.tensor(list(weight_decays), dtype=torch.float32, device=dev)
        self.active = torch.ones(self.g, dtype=torch.bool, device=dev)
        self.betas, self.eps, self.step_count = betas, eps, 0
        self.chunk = chunk or self.g
        self._m = {k: torch.zeros_like(v) for k, v in params.items() if v.requires_grad}
        self._v = {k: torch.zeros_like(v) for k, v in params.items() if v.requires_grad}
        # A skeleton module on the meta device: functional_call swaps the stacked slices in.
        self._base = copy.deepcopy(head).to("meta")

        def logits_only(p: dict[str, Tensor], b: dict[str, Tensor], feats: Features) -> Tensor:
            return functional_call(self._base, (p, b), (feats,))[0]

        def with_attention(p: dict[str, Tensor], b: dict[str, Tensor], feats: Features) -> tuple[Tensor, Tensor]:
            return functional_call(self._base, (p, b), (feats,))

        self._vcall = vmap(logits_only, in_dims=(0, 0, None), randomness="different")
        self._vcall_attn = vmap(with_attention, in_dims=(0, 0, None), randomness="different")

    def trainable(self) -> list[str]:
        return list(self._m)

    def forward(self, feats: Features, train: bool = False, attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits [G, B, K] (and attention [G, B, H, K, N] when asked and the head has it) for every config,
        without gradients."""
        self._base.train(train)
        attention = attention and self.template.has_attention
        outs, attns = [], []
        with torch.no_grad():
            for s in range(0, self.g, self.chunk):
                sl = slice(s, s + self.chunk)
                args = ({k: v[sl] for k, v in self.params.items()}, {k: v[sl] for k, v in self.buffers.items()}, feats)
                if attention:
                    logits, attn = self._vcall_attn(*args)
                    attns.append(attn)
                else:
                    logits = self._vcall(*args)
                outs.append(logits)
        return torch.cat(outs), (torch.cat(attns) if attns else None)

    def train_step(self, feats: Features, targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
                   lr_scale: float) -> Tensor:
        """One optimisation step of all configs on one batch; returns the per-config loss [G] (detached)."""
        self._base.train(True)
        losses = []
        for s in range(0, self.g, self.chunk):
            sl = slice(s, s + self.chunk)
            logits = self._vcall({k: v[sl] for k, v in self.params.items()},
                                 {k: v[sl] for k, v in self.buffers.items()}, feats)
            loss = loss_fn(logits, targets)
            # Configs are independent, so the gradient of the sum is each config's own gradient.
            loss.sum().backward()
            losses.append(loss.detach())
        self._adamw(lr_scale)
        return torch.cat(losses)

    @torch.no_grad()
    def _adamw(self, lr_scale: float) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.step_count, 1 - b2**self.step_count
        lr = self.lr * lr_scale * self.active
        for k in self._m:
            p = self.params[k]
            if p.grad is None:
                continue
            g = torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0)  # as the original: NaN grads zeroed
            p.grad = None
            view = (-1,) + (1,) * (p.ndim - 1)
            m, v = self._m[k], self._v[k]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if p.ndim > 2:  # weight decay on matrices only (no biases, norms, per-class bias vectors)
                p.mul_(1 - (lr * self.wd).view(view))
            p.sub_(lr.view(view) * (m / c1) / ((v / c2).sqrt() + self.eps))

    # -- snapshots of the best state per config --
    def snapshot(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in {**self.params, **self.buffers}.items()}

    @torch.no_grad()
    def update_snapshot(self, snap: dict[str, Tensor], rows: Tensor) -> None:
        """Copy the current state of configs `rows` (bool [G]) into `snap`."""
        for k, v in {**self.params, **self.buffers}.items():
            snap[k][rows] = v.detach()[rows]

    def extract(self, g: int, state: dict[str, Tensor] | None = None) -> Head:
        """Config g as a standalone head (from `state`, e.g. a best-state snapshot, or the current weights)."""
        src = state if state is not None else {**self.params, **self.buffers}
        head = copy.deepcopy(self.template)
        head.load_state_dict({k: v[g].detach().clone() for k, v in src.items()})
        return head.eval()


def cosine_scale(step: int, total: int, warmup: int = 0) -> float:
    """Linear warmup then cosine annealing to 0 (the original: CosineAnnealingLR over all iterations)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
