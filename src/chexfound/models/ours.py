"""Save/load a backbone in our format (safetensors + config + input transform in the metadata)."""

from __future__ import annotations

from os import PathLike
from typing import Any

from chexfound.errors import CheckpointError
from chexfound.models.config import ViTConfig
from chexfound.models.format import load_tensors, save_tensors, state_dict_sha256
from chexfound.models.vit import VisionTransformer


def backbone_sha256(model: VisionTransformer) -> str:
    return state_dict_sha256(model.state_dict())


def save_backbone(
    model: VisionTransformer,
    path: str | PathLike[str],
    transform: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write `model` (and its config/transform) to `path`; returns the file SHA-256."""
    from chexfound.data.transform import InputTransform

    sd = model.state_dict()
    meta = {
        "kind": "backbone",
        "config": model.cfg.to_dict(),
        "transform": transform or InputTransform.for_backbone(model.cfg).to_dict(),
        "weights_sha256": state_dict_sha256(sd),
        **(extra or {}),
    }
    return save_tensors(path, sd, meta)


def load_ours(path: str | PathLike[str]) -> tuple[VisionTransformer, dict[str, Any]]:
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "backbone":
        raise CheckpointError(path, f"expected a backbone file, found kind={meta.get('kind')!r}")
    cfg = ViTConfig.from_dict(meta["config"])
    model = VisionTransformer(cfg)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(path, f"backbone keys do not match its config: missing {missing}, unexpected {unexpected}")
    return model.eval(), meta
