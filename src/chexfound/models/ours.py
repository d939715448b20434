"""Save/load a backbone in our format: safetensors with the config and input transform in the metadata.

Layout: backbone tensors under their own names (`blocks.<i>...`); heads that came with the weights (DINO /
iBOT heads of an SSL checkpoint, a classifier of an HF model) under `heads.<name>.<param>`, their names
listed in meta["head_names"], so converting a checkpoint never loses them.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from chexfound.errors import CheckpointError
from chexfound.models.card import ModelFile, ResultTable, write_card
from chexfound.models.config import ViTConfig
from chexfound.models.format import FORMAT_VERSION, load_tensors, save_tensors, state_dict_sha256
from chexfound.models.info import ModelInfo
from chexfound.models.vit import VisionTransformer

HEADS_PREFIX = "heads."


def backbone_sha256(model: VisionTransformer) -> str:
    """The weights hash of a backbone (`state_dict_sha256`): its identity, independent of the file it came from."""
    return state_dict_sha256(model.state_dict())


def backbone_meta(model: VisionTransformer, transform: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None, head_names: Sequence[str] = ()) -> dict[str, Any]:
    """Our description of a backbone: config (with its name), input transform, weights hash, provenance.
    Written as the safetensors metadata of a backbone file and as the `chexfound` entry of the torch
    checkpoints pretraining exports, so either file says exactly which model it holds."""
    from chexfound.data.transform import InputTransform

    if transform is None:
        info = getattr(model, "info", None)
        transform = info.transform.to_dict() if info is not None else InputTransform.for_backbone(model.cfg).to_dict()
    return {
        **(extra or {}),
        "kind": "backbone",
        "config": model.cfg.to_dict(),
        "transform": transform,
        "weights_sha256": state_dict_sha256(model.state_dict()),
        "head_names": sorted(head_names),
    }


def checkpoint_entry(model: VisionTransformer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`backbone_meta` as plain JSON values (what `torch.load(weights_only=True)` may read back), with the
    format version: put it under META_KEY beside the state dict of a torch checkpoint."""
    return json.loads(json.dumps({"format_version": FORMAT_VERSION, **backbone_meta(model, extra=extra)}))


def save_backbone(
    model: VisionTransformer,
    path: str | PathLike[str],
    transform: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    heads: dict[str, dict[str, Tensor]] | None = None,
    results: Sequence[ResultTable] = (),
) -> str:
    """Write `model` (its config, transform, provenance and any `heads`) to `path`, and its model card beside
    it (`chexfound.models.card`, with the `results` the caller's run measured); returns the file SHA-256.
    A model from `create_backbone` keeps its transform and provenance (`model.info`) unless given here."""
    sd = model.state_dict()
    tensors = dict(sd)
    for name, hsd in sorted((heads or {}).items()):
        if "." in name:
            raise ValueError(f"head name {name!r} must not contain '.'")
        for k, v in hsd.items():
            tensors[f"{HEADS_PREFIX}{name}.{k}"] = v
    info = getattr(model, "info", None)
    origin = info.file_extra() if info is not None else {}
    meta = backbone_meta(model, transform, {**origin, **(extra or {})}, head_names=list(heads or {}))
    sha = save_tensors(path, tensors, meta)
    write_card(ModelFile(Path(path), "backbone", sha), saved_info(model, meta, path), results=results)
    return sha


def saved_info(model: VisionTransformer, meta: dict[str, Any], path: str | PathLike[str]) -> ModelInfo:
    """The `ModelInfo` that loading the file just written with `meta` gives (without reading it back)."""
    from chexfound.data.transform import InputTransform
    from chexfound.models.info import count_params, origin_from_file_meta

    return ModelInfo(name=model.cfg.name or Path(path).stem, config=model.cfg,
                     transform=InputTransform.from_dict(meta["transform"]), weights_sha256=meta["weights_sha256"],
                     source=str(path), format="chexfound", config_source="file metadata",
                     num_params=count_params(model), origin=origin_from_file_meta(meta))


def read_ours(path: str | PathLike[str]) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, Any]]:
    """-> (backbone tensors, heads, file metadata) of a chexfound backbone file."""
    tensors, meta = load_tensors(path)
    kind = meta.get("kind")
    if kind == "head":
        raise CheckpointError(path, f"this is a chexfound head file (head_type={meta.get('head_type')!r}), not a "
                                    "backbone; load it with chexfound.adapt.load_head")
    if kind == "classifier":
        raise CheckpointError(path, "this is a chexfound classifier bundle (backbone + head, from `chexfound export "
                                    "--format safetensors`), not a backbone file; use it with --model")
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
    """Strictly load our backbone file -> (model in eval mode with `model.info`, the legacy meta dict).
    Prefer `chexfound.models.create_backbone(path)`."""
    from chexfound.data.transform import InputTransform
    from chexfound.models.info import ModelInfo, attach_info, origin_from_file_meta
    from chexfound.models.loaders.keys import tensor_dtypes
    from chexfound.models.loaders.strict import load_backbone_strict

    backbone, heads, meta = read_ours(path)
    try:
        cfg = config or ViTConfig.from_dict(meta["config"])
        transform = InputTransform.from_dict(meta["transform"]) if meta.get("transform") and config is None \
            else InputTransform.for_backbone(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid config or transform in metadata ({e})") from e
    model, warns = load_backbone_strict(cfg, backbone, Path(path))
    sha = meta.get("weights_sha256") if config is None and meta.get("weights_sha256") else backbone_sha256(model)
    info = ModelInfo(
        name=cfg.name or Path(path).stem, config=cfg, transform=transform, weights_sha256=sha, source=str(path),
        format="chexfound", config_source="file metadata", origin=origin_from_file_meta(meta), heads=heads,
        warnings=warns, source_dtypes=tensor_dtypes(backbone))
    attach_info(model, info)
    return model, info.to_meta()
