"""Save/load a backbone in our format: safetensors with the config and input transform in the metadata.

Layout: backbone tensors under their own names (`blocks.<i>...`); heads that came with the weights (DINO /
iBOT heads of an SSL checkpoint, a classifier of an HF model) under `heads.<name>.<param>`, their names
listed in meta["head_names"], so converting a checkpoint never loses them.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

from torch import Tensor

from chexfound.errors import CheckpointError
from chexfound.models.config import ViTConfig
from chexfound.models.format import load_tensors, save_tensors, state_dict_sha256
from chexfound.models.vit import VisionTransformer

HEADS_PREFIX = "heads."


def backbone_sha256(model: VisionTransformer) -> str:
    return state_dict_sha256(model.state_dict())


def save_backbone(
    model: VisionTransformer,
    path: str | PathLike[str],
    transform: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    heads: dict[str, dict[str, Tensor]] | None = None,
) -> str:
    """Write `model` (its config, transform and any `heads`) to `path`; returns the file SHA-256."""
    from chexfound.data.transform import InputTransform

    sd = model.state_dict()
    tensors = dict(sd)
    for name, hsd in sorted((heads or {}).items()):
        if "." in name:
            raise ValueError(f"head name {name!r} must not contain '.'")
        for k, v in hsd.items():
            tensors[f"{HEADS_PREFIX}{name}.{k}"] = v
    meta = {
        **(extra or {}),
        "kind": "backbone",
        "config": model.cfg.to_dict(),
        "transform": transform or InputTransform.for_backbone(model.cfg).to_dict(),
        "weights_sha256": state_dict_sha256(sd),
        "head_names": sorted(heads or {}),
    }
    return save_tensors(path, tensors, meta)


def read_ours(path: str | PathLike[str]) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, Any]]:
    """-> (backbone tensors, heads, file metadata) of a chexfound backbone file."""
    tensors, meta = load_tensors(path)
    kind = meta.get("kind")
    if kind == "head":
        raise CheckpointError(path, f"this is a chexfound head file (head_type={meta.get('head_type')!r}), not a "
                                    "backbone; load it with chexfound.adapt.load_head")
    if kind != "backbone":
        raise CheckpointError(path, f"expected a backbone file, found kind={kind!r}")
    if "config" not in meta:
        raise CheckpointError(path, "backbone file has no config in its metadata")
    names = list(meta.get("head_names") or [])
    backbone: dict[str, Tensor] = {}
    heads: dict[str, dict[str, Tensor]] = {n: {} for n in names}
    for k, v in tensors.items():
        if k.startswith(HEADS_PREFIX):
            rest = k[len(HEADS_PREFIX):]
            name = next((n for n in names if rest.startswith(n + ".")), None)
            if name is None:
                raise CheckpointError(path, f"tensor {k!r} belongs to no listed head ({names})")
            heads[name][rest[len(name) + 1:]] = v
        else:
            backbone[k] = v
    return backbone, heads, meta


def load_ours(path: str | PathLike[str], config: ViTConfig | None = None) -> tuple[VisionTransformer, dict[str, Any]]:
    """Strictly load our backbone file -> (model in eval mode, meta with meta["heads"] as tensors)."""
    from chexfound.models.loaders.strict import load_backbone_strict

    backbone, heads, meta = read_ours(path)
    try:
        cfg = config or ViTConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid config in metadata ({e})") from e
    model, warns = load_backbone_strict(cfg, backbone, Path(path))
    from chexfound.models.loaders.keys import tensor_dtypes

    meta = {**meta, "format": "chexfound", "source": str(path), "heads": heads, "warnings": warns, "ignored": [],
            "notes": [], "source_dtypes": tensor_dtypes(backbone), "converted_from": meta.get("source")}
    if config is not None:
        from chexfound.data.transform import InputTransform

        meta["config"] = cfg.to_dict()
        meta["transform"] = InputTransform.for_backbone(cfg).to_dict()
        meta["weights_sha256"] = backbone_sha256(model)
    return model, meta
