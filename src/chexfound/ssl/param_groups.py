"""Optimizer parameter groups (DINOv2's rules, plus no decay on tokens).

Per parameter: weight-decay multiplier 0 for biases, norms, LayerScale gammas (and, unless
`no_decay_tokens` is off, the cls/pos/register/mask tokens, which the original decays); lr multiplier
`patch_embed_lr_mult` for the patch embedding and `layerwise_decay ** (depth + 1 - layer)` with layer 0 =
embeddings/tokens, i + 1 = block i, depth + 1 = final norm and heads; prototype layers (`last_layer`) are
flagged so the loop can freeze them. Parameters with equal multipliers are fused into one group.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

TOKENS = ("cls_token", "pos_embed", "register_tokens", "mask_token")


def layer_id(name: str, depth: int) -> int:
    """Layer index of a student parameter name (`backbone.blocks.3.attn...` -> 4)."""
    if name.startswith("backbone."):
        rest = name[len("backbone."):]
        if rest.startswith(("patch_embed",)) or rest in TOKENS:
            return 0
        if rest.startswith("blocks."):
            return int(rest.split(".")[1]) + 1
    return depth + 1


def param_group_rules(name: str, depth: int, cfg: dict[str, Any]) -> dict[str, Any]:
    o = cfg["optim"]
    lr_mult = float(o["layerwise_decay"]) ** (depth + 1 - layer_id(name, depth))
    wd_mult = 1.0
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(".bias") or "norm" in name or "gamma" in name:
        wd_mult = 0.0
    if o.get("no_decay_tokens", True) and leaf in TOKENS:
        wd_mult = 0.0
    if "patch_embed" in name:
        lr_mult *= float(o["patch_embed_lr_mult"])
    return {"lr_multiplier": lr_mult, "wd_multiplier": wd_mult, "is_last_layer": "last_layer" in name}


def build_param_groups(named: Iterable[tuple[str, nn.Parameter]], depth: int, cfg: dict[str, Any]) -> list[dict]:
    fused: dict[tuple, dict[str, Any]] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        r = param_group_rules(name, depth, cfg)
        key = (r["lr_multiplier"], r["wd_multiplier"], r["is_last_layer"])
        g = fused.setdefault(key, {**r, "params": [], "names": []})
        g["params"].append(p)
        g["names"].append(name)
    return list(fused.values())


def apply_schedule(optimizer: Any, lr: float, wd: float, last_layer_lr: float) -> None:
    for g in optimizer.param_groups:
        g["weight_decay"] = wd * g["wd_multiplier"]
        g["lr"] = (last_layer_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]
