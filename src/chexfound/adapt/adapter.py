"""Parameter-efficient fine-tunes saved as adapters, not copies: what LoRA or BitFit changed, tied to the
base backbone it was trained on.

Adapter file (safetensors, our format; `chexfound adapt --finetune lora|bitfit` writes `<name>.adapter.safetensors`):
  tensors  LoRA:   `blocks.<i>.attn.{qkv,proj}.lora_a` [r, in] and `.lora_b` [out, r] (un-merged, un-scaled)
           BitFit: every bias of the backbone (`blocks.<i>.attn.qkv.bias`, ...), the trained values
  metadata kind="adapter", method ("lora" | "bitfit"), base_sha256 (weights SHA-256 of the base backbone),
           adapted_sha256 (the merged backbone's, which the head trained with it records), base_config,
           lora {r, alpha, dropout, targets}, transform.

A ViT-L/16 LoRA adapter (r 16 on qkv and proj: 2.4 M parameters) is 9.4 MB against the 1.2 GB backbone.
`apply_adapter` loads one onto a backbone only when that backbone's weights SHA-256 is the recorded base; merging is
bitwise reproducible (`lora_delta`), so base + adapter gives back exactly the backbone the head was
trained on and its SHA-256 is checked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from chexfound.adapt.finetune import LoRALinear, apply_lora, merge_lora
from chexfound.errors import CheckpointError
from chexfound.models.format import load_tensors, save_tensors, state_dict_sha256
from chexfound.models.info import ModelInfo, attach_info, info_of

Method = Literal["lora", "bitfit"]
ADAPTER_METHODS = ("lora", "bitfit")


@dataclass
class Adapter:
    """An adapter in memory: its tensors (see the module docstring for names) and what it belongs to."""

    method: Method
    tensors: dict[str, Tensor]
    base_sha256: str
    adapted_sha256: str = ""
    base_config: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)  # r, alpha, dropout, targets
    transform: dict[str, Any] | None = None
    source: str = "in memory"

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def lora_pairs(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{`blocks.<i>.attn.qkv`: (A [r, in], B [out, r])} for a LoRA adapter."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for k in self.tensors:
            if k.endswith(".lora_a"):
                mod = k[: -len(".lora_a")]
                out[mod] = (self.tensors[k], self.tensors[mod + ".lora_b"])
        return out

    @property
    def scaling(self) -> float:
        return float(self.lora["alpha"]) / int(self.lora["r"])


def adapter_from_model(model: nn.Module, method: Method, base_sha256: str,
                       lora: dict[str, Any] | None = None) -> Adapter:
    """Capture what `method` trained on `model` (LoRA wrappers still in place for LoRA) as an Adapter."""
    if method == "lora":
        tensors = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if ".lora_" in n}
        if not tensors:
            raise ValueError("the model has no LoRA parameters (apply_lora was not called)")
        first = next(m for m in model.modules() if isinstance(m, LoRALinear))
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)})
        lora = {"r": first.r, "alpha": first.scaling * first.r, "dropout": float(first.drop.p), "targets": targets,
                **(lora or {})}
    elif method == "bitfit":
        tensors = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if n.endswith(".bias")}
        lora = {}
    else:
        raise ValueError(f"no adapter for fine-tuning mode {method!r} (adapters: {', '.join(ADAPTER_METHODS)})")
    cfg = getattr(model, "cfg", None)
    return Adapter(method, tensors, base_sha256, base_config=cfg.to_dict() if cfg is not None else {}, lora=lora)


def save_adapter(adapter: Adapter, path: str | PathLike[str]) -> str:
    """Write the adapter file; returns its SHA-256."""
    meta = {"kind": "adapter", "method": adapter.method, "base_sha256": adapter.base_sha256,
            "adapted_sha256": adapter.adapted_sha256, "base_config": adapter.base_config, "lora": adapter.lora,
            "transform": adapter.transform, "num_params": adapter.num_params}
    return save_tensors(path, adapter.tensors, meta)


def load_adapter(path: str | PathLike[str]) -> Adapter:
    """Read an adapter file (CheckpointError naming it when it is another kind of file or incomplete)."""
    p = Path(path)
    tensors, meta = load_tensors(p)
    if meta.get("kind") != "adapter":
        raise CheckpointError(p, f"expected an adapter file (from `chexfound adapt --finetune lora|bitfit`), "
                                 f"found kind={meta.get('kind')!r}")
    method = meta.get("method")
    if method not in ADAPTER_METHODS or not meta.get("base_sha256"):
        raise CheckpointError(p, f"adapter metadata lacks a known method or the base backbone's SHA-256 "
                                 f"(method={method!r})")
    ad = Adapter(method, tensors, meta["base_sha256"], meta.get("adapted_sha256") or "",
                 meta.get("base_config") or {}, meta.get("lora") or {}, meta.get("transform"), str(p))
    if method == "lora":
        if not {"r", "alpha"} <= set(ad.lora):
            raise CheckpointError(p, "LoRA adapter metadata lacks r / alpha")
        unpaired = sorted(k for k in tensors if k.endswith(".lora_a") and k[:-1] + "b" not in tensors)
        if unpaired or not tensors:
            raise CheckpointError(p, f"LoRA adapter has A matrices without B: {unpaired}" if unpaired
                                  else "LoRA adapter holds no tensors")
    return ad


def check_adapter_base(base: nn.Module, adapter: Adapter) -> ModelInfo:
    """The base's ModelInfo, or a CheckpointError naming the adapter when `base` is not the backbone it was
    trained on (compared by weights SHA-256)."""
    base_info = info_of(base)
    if base_info.weights_sha256 != adapter.base_sha256:
        raise CheckpointError(adapter.source, f"this adapter was trained on the backbone with weights SHA-256 "
                                              f"{adapter.base_sha256[:12]}..., not on {base_info.name or 'this one'} "
                                              f"({base_info.weights_sha256[:12]}..., {base_info.source}); "
                                              f"load it onto its own base")
    return base_info


def apply_adapter(base: nn.Module, adapter: Adapter, merge: bool = True) -> nn.Module:
    """A copy of `base` with the adapter applied: merged into plain weights (default; the result has the
    fine-tuned backbone's SHA-256, checked against the adapter's record), or with LoRA wrappers left in place
    (`merge=False`, for training on or inspection). Refuses a base whose weights are not the adapter's base."""
    base_info = check_adapter_base(base, adapter)
    model = copy.deepcopy(base).float().cpu()
    if adapter.method == "lora":
        targets = tuple(adapter.lora.get("targets") or ("qkv", "proj"))
        wrapped = set(apply_lora(model, int(adapter.lora["r"]), float(adapter.lora["alpha"]),
                                 float(adapter.lora.get("dropout", 0.0)), targets))
        pairs = adapter.lora_pairs()
        if set(pairs) != wrapped:
            raise CheckpointError(adapter.source, f"LoRA adapter modules do not match the backbone: missing "
                                                  f"{sorted(wrapped - set(pairs))[:4]}, unknown "
                                                  f"{sorted(set(pairs) - wrapped)[:4]}")
        modules = dict(model.named_modules())
        for name, (a, b) in pairs.items():
            m = modules[name]
            if tuple(a.shape) != tuple(m.lora_a.shape) or tuple(b.shape) != tuple(m.lora_b.shape):
                raise CheckpointError(adapter.source, f"{name}: LoRA shapes {tuple(a.shape)}/{tuple(b.shape)} do not "
                                                      f"fit {tuple(m.lora_a.shape)}/{tuple(m.lora_b.shape)}")
            with torch.no_grad():
                m.lora_a.copy_(a)
                m.lora_b.copy_(b)
        if merge:
            merge_lora(model)
    else:
        params = dict(model.named_parameters())
        unknown = sorted(set(adapter.tensors) - set(params))
        if unknown:
            raise CheckpointError(adapter.source, f"BitFit adapter has tensors the backbone lacks: {unknown[:4]}")
        with torch.no_grad():
            for k, v in adapter.tensors.items():
                if params[k].shape != v.shape:
                    raise CheckpointError(adapter.source, f"{k}: shape {tuple(v.shape)} does not fit "
                                                          f"{tuple(params[k].shape)}")
                params[k].copy_(v)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if merge or adapter.method == "bitfit":
        sha = state_dict_sha256(model.state_dict())
        if adapter.adapted_sha256 and sha != adapter.adapted_sha256:
            raise CheckpointError(adapter.source, f"base + adapter gives weights SHA-256 {sha[:12]}..., not the "
                                                  f"fine-tuned backbone's {adapter.adapted_sha256[:12]}...")
        origin = {**base_info.origin, "adapter": {"method": adapter.method, "source": adapter.source,
                                                  "base_sha256": adapter.base_sha256}}
        info: ModelInfo = replace(base_info, weights_sha256=sha, origin=origin, num_params=0,
                                  source=f"{base_info.source} + {adapter.source}",
                                  notes=[*base_info.notes, f"{adapter.method} adapter {adapter.source} merged"])
        attach_info(model, info)
    else:
        model.__dict__.pop("info", None)  # the base's identity would be wrong for the wrapped model
    return model


__all__ = ["ADAPTER_METHODS", "Adapter", "adapter_from_model", "apply_adapter", "check_adapter_base", "load_adapter",
           "save_adapter"]
