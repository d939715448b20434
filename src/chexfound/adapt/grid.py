"""Many heads of one architecture trained as one: parameters stacked along a leading "config" axis and the
forward vmapped (torch.func), so every batch of cached features is read once and fed to all learning-rate /
weight-decay configs together. AdamW (torch's fused kernel) runs with one lr and weight decay per config.

On a CPU the training step instead runs the configs one after another on the same batch (`loop=True`, the
default there): each config's parameters are leaf tensors sharing the stacked storage, so a step is 13 plain
head steps whose working set stays in cache, without vmap's batching of every elementwise op over all configs
(measured: the vmapped step costs ~1.26x the loop's CPU time). Evaluation stays vmapped.

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
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, chunk: int | None = None,
                 loop: bool | None = None) -> None:
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
        self._step_tensor = torch.zeros((), dtype=torch.float32, device=dev)
        self._fused_views: list | None = None
        # Per config, leaf tensors on the stacked storage (updates in place reach the stack): the loop's step.
        self.loop = dev.type == "cpu" if loop is None else bool(loop)
        self._leaves = ([{k: params[k][c].detach().requires_grad_() for k in self._m} for c in range(self.g)]
                        if self.loop else None)
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
        if self._leaves is not None:
            for c, leaves in enumerate(self._leaves):
                frozen = {k: v[c] for k, v in self.params.items() if k not in leaves}
                logits = functional_call(self._base, ({**frozen, **leaves}, {k: v[c] for k, v in self.buffers.items()}),
                                         (feats,))[0]
                loss = loss_fn(logits, targets)
                loss.backward()
                losses.append(loss.detach().reshape(1))
            self._adamw(lr_scale)
            return torch.cat(losses)
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
        """AdamW with one lr and weight decay per config: torch's fused kernel (one pass over each tensor
        instead of a dozen) on each config's parameters (leaves or slices of the stacked tensors)."""
        self.step_count += 1
        if self._fused_views is None:
            self._fused_views = self._config_views()
        self._step_tensor.fill_(float(self.step_count))
        b1, b2 = self.betas
        lrs = (self.lr * lr_scale * self.active).tolist()
        for c, (lr, wd) in enumerate(zip(lrs, self.wd.tolist())):
            grads = self._grads(c)
            for decay, (params, ms, vs, names) in self._fused_views[c].items():
                # A parameter without a gradient this step is left alone (its moments too), as torch's AdamW does.
                have = [i for i, k in enumerate(names) if grads[k] is not None]
                if not have:
                    continue
                gs = [grads[names[i]] for i in have]
                for g in gs:  # as the original: NaN / inf gradients are zeroed (in place)
                    g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                torch._fused_adamw_([params[i] for i in have], gs, [ms[i] for i in have], [vs[i] for i in have], [],
                                    [self._step_tensor] * len(have), lr=lr, beta1=b1, beta2=b2,
                                    weight_decay=wd if decay else 0.0, eps=self.eps, amsgrad=False, maximize=False)
        for k in self._m:
            self.params[k].grad = None
        for leaves in self._leaves or []:
            for t in leaves.values():
                t.grad = None

    def _grads(self, c: int) -> dict[str, Tensor | None]:
        if self._leaves is not None:
            return {k: t.grad for k, t in self._leaves[c].items()}
        return {k: None if self.params[k].grad is None else self.params[k].grad[c] for k in self._m}

    def _config_views(self) -> list[dict[bool, tuple[list[Tensor], list[Tensor], list[Tensor], list[str]]]]:
        """Per config: its parameters and moments, split by whether weight decay applies (matrices only: no
        biases, norms or per-class bias vectors)."""
        out: list[dict[bool, tuple[list[Tensor], list[Tensor], list[Tensor], list[str]]]] = []
        for c in range(self.g):
            groups: dict[bool, tuple[list[Tensor], list[Tensor], list[Tensor], list[str]]] = {}
            for k in self._m:
                p = self.params[k]
                ps, ms, vs, names = groups.setdefault(p.ndim > 2, ([], [], [], []))
                ps.append(self._leaves[c][k] if self._leaves is not None else p.data[c])
                ms.append(self._m[k][c]), vs.append(self._v[k][c]), names.append(k)
            out.append(groups)
        return out

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
