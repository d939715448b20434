"""Backbone shards: one backbone as `<prefix>.<i>-of-<n>.safetensors` files of at most a given size each (bf16 by
default), small enough to travel where file sizes are capped (the GPU proof's teacher export).

Every shard is our safetensors format (`chexfound.models.format`) with metadata kind "backbone_shard": the full
config and input transform, the shard's index and count, the dtype, and the SHA-256 of the whole fp32 state
it was cut from. `create_backbone(folder)` (or any one shard file) reassembles them: the model, in fp32, with
`model.info` like any other backbone (format "chexfound_shards").
"""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chexfound.errors import CheckpointError
from chexfound.models.vit import VisionTransformer

__all__ = ["SHARD_KIND", "find_shards", "load_backbone_shards", "load_shards_as_backbone", "save_backbone_shards"]

SHARD_KIND = "backbone_shard"
_SHARD_RE = re.compile(r"^(?P<prefix>.*\.)(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")
_HEADER_ROOM = 64 * 1024  # bytes kept free in each shard for the safetensors header and our metadata


def save_backbone_shards(model: VisionTransformer, out_dir: str | PathLike[str], max_mib: float,
                         extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.bfloat16,
                         prefix: str = "teacher_backbone.") -> list[Path]:
    """Write `model` as shards of at most `max_mib` MiB each (tensors in `dtype`); returns the files in order.
    `extra` is stored in every shard's metadata (e.g. {"ssl": run provenance})."""
    from chexfound.data.transform import InputTransform
    from chexfound.models.format import save_tensors, state_dict_sha256

    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    limit = int(max_mib * 2**20) - _HEADER_ROOM
    groups: list[list[str]] = [[]]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if n > limit:
            raise CheckpointError(None, f"{k} alone ({n / 2**20:.1f} MiB) exceeds the {max_mib} MiB shard size")
        if size + n > limit and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    meta = {"kind": SHARD_KIND, "config": model.cfg.to_dict(),
            "transform": InputTransform.for_backbone(model.cfg).to_dict(), "dtype": str(dtype).replace("torch.", ""),
            "fp32_weights_sha256": state_dict_sha256(model.state_dict()), "n_shards": len(groups), **(extra or {})}
    out = []
    for i, keys in enumerate(groups):
        path = Path(out_dir) / f"{prefix}{i + 1:02d}-of-{len(groups):02d}.safetensors"
        save_tensors(path, {k: sd[k] for k in keys}, {**meta, "shard": i + 1})
        out.append(path)
    return out


def _is_shard(path: Path) -> bool:
    from chexfound.models.format import read_meta

    try:
        return read_meta(path).get("kind") == SHARD_KIND
    except CheckpointError:
        return False


def find_shards(path: str | PathLike[str]) -> list[Path] | None:
    """The shard files of the set that `path` (a folder holding one set, or one of its files) belongs to; None
    when `path` is no shard set (then it is some other kind of weights)."""
    p = Path(path)
    if p.is_file():
        m = _SHARD_RE.match(p.name)
        if not m or not _is_shard(p):
            return None
        return sorted(p.parent.glob(f"{glob_escape(m.group('prefix'))}*-of-{m.group('n')}.safetensors"))
    if p.is_dir():
        files = sorted(q for q in p.glob("*-of-*.safetensors") if _SHARD_RE.match(q.name))
        if files and _is_shard(files[0]):
            prefixes = {_SHARD_RE.match(q.name).group("prefix") for q in files}  # type: ignore[union-attr]
            if len(prefixes) > 1:
                raise CheckpointError(p, f"folder holds {len(prefixes)} shard sets ({sorted(prefixes)}); name one "
                                         "of their files")
            return files
    return None


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def _read_shards(where: Path, files: list[Path]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from chexfound.models.format import load_tensors

    sd: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for f in files:
        t, meta = load_tensors(f)
        if meta.get("kind") != SHARD_KIND:
            raise CheckpointError(f, f"not a backbone shard (kind={meta.get('kind')!r})")
        sd.update(t)
    if len(files) != int(meta["n_shards"]):
        raise CheckpointError(where, f"{len(files)} shard files, expected {meta['n_shards']}")
    return sd, meta


def load_backbone_shards(folder: str | PathLike[str], prefix: str = "teacher_backbone.") -> \
        tuple[VisionTransformer, dict[str, Any]]:
    """Reassemble the `<prefix>*-of-*.safetensors` shards in `folder` -> (fp32 model in eval mode, metadata)."""
    from chexfound.models.config import ViTConfig

    files = sorted(Path(folder).glob(f"{glob_escape(prefix)}*-of-*.safetensors"))
    if not files:
        raise CheckpointError(folder, "no backbone shards here")
    sd, meta = _read_shards(Path(folder), files)
    vit = VisionTransformer(ViTConfig.from_dict(meta["config"]))
    missing, unexpected = vit.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise CheckpointError(folder, f"shards do not match the config: missing {missing}, unexpected {unexpected}")
    return vit.eval(), meta


def load_shards_as_backbone(path: Path, files: list[Path], config: Any = None) -> VisionTransformer:
    """The backbone of a shard set (see `find_shards`), strictly loaded, with `model.info` (what `load_file` does
    for a folder or file of shards). `config` (a ViTConfig) replaces the architecture the shards record."""
    from chexfound.data.transform import InputTransform
    from chexfound.models.config import ViTConfig
    from chexfound.models.format import state_dict_sha256
    from chexfound.models.info import ModelInfo, attach_info, origin_from_file_meta
    from chexfound.models.loaders.keys import tensor_dtypes
    from chexfound.models.loaders.strict import load_backbone_strict

    sd, meta = _read_shards(path, files)
    try:
        cfg = config or ViTConfig.from_dict(meta["config"])
        transform = InputTransform.from_dict(meta["transform"]) if meta.get("transform") and config is None \
            else InputTransform.for_backbone(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid config or transform in the shards' metadata ({e})") from e
    model, warns = load_backbone_strict(cfg, {k: v.float() for k, v in sd.items()}, path)
    origin = {k: v for k, v in origin_from_file_meta(meta).items()
              if k not in ("n_shards", "shard", "dtype", "fp32_weights_sha256")}
    info = ModelInfo(
        name=cfg.name or files[0].name.split(".")[0], config=cfg, transform=transform,
        weights_sha256=state_dict_sha256(model.state_dict()), source=str(path), format="chexfound_shards",
        config_source="file metadata" if config is None else "the given config", origin=origin, warnings=warns,
        notes=[f"reassembled from {len(files)} {meta.get('dtype', '')} shards (the fp32 weights they were cut from: "
               f"SHA-256 {str(meta.get('fp32_weights_sha256', ''))[:12]}...)"],
        source_dtypes=tensor_dtypes(sd))
    return attach_info(model, info)  # type: ignore[return-value]
