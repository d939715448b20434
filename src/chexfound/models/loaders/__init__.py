"""`load_backbone(path, config=None)`: any supported backbone file -> (VisionTransformer, meta).

Formats (detected from the file, not its name):
- chexfound: our safetensors (config + transform in the metadata),
- chexfound_official: CheXFound `teacher_checkpoint.pth` ({"teacher": ...}, backbone./dino_head./ibot_head.
  prefixes, chunked or flat blocks) with `config.yaml` when given or found beside it,
- dinov2: original DINOv2 `.pth` state dicts,
- hf_dinov2: Hugging Face Dinov2Model / Dinov2WithRegistersModel (model.safetensors or pytorch_model.bin,
  config.json and preprocessor_config.json beside it).
Loading is strict for the backbone (missing or unexpected keys -> CheckpointError listing them); a different
position-embedding grid is resized with a warning; heads in the file are returned in meta["heads"].

meta keys: kind, format, source, config (dict), config_source, transform (dict), weights_sha256,
heads ({name: {param: tensor}}), ignored (what was deliberately not loaded), notes, warnings, source_dtypes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import fields, replace
from os import PathLike
from pathlib import Path
from typing import Any

from chexfound.errors import CheckpointError, ConfigError
from chexfound.models.config import IMAGENET_MEAN, IMAGENET_STD, ViTConfig
from chexfound.models.format import META_KEY, state_dict_sha256
from chexfound.models.loaders.describe import ARCHITECTURES, SUPPORTED, describe_state_dict
from chexfound.models.loaders.files import read_json, read_safetensors, read_safetensors_meta, sniff, load_weights_only
from chexfound.models.loaders.hf import config_from_hf, filter_hf_dinov2, hf_uses_mask_token, looks_hf
from chexfound.models.loaders.infer import complete_from_registry, infer_config, match_registry
from chexfound.models.loaders.keys import Filtered, RawStateDict, tensor_dtypes, unwrap_state_dict
from chexfound.models.loaders.official import (
    config_from_dinov2_yaml,
    filter_chexfound_official,
    filter_dinov2,
    find_release_config,
    is_dinov2_ssl_config,
    looks_official,
    read_yaml,
)
from chexfound.models.loaders.strict import load_backbone_strict
from chexfound.models.registry import get_config, list_configs
from chexfound.models.vit import VisionTransformer

log = logging.getLogger(__name__)

__all__ = ["SUPPORTED", "load_backbone", "resolve_config", "read_foreign"]

ConfigLike = ViTConfig | str | PathLike[str] | Mapping[str, Any] | None


def resolve_config(config: ConfigLike) -> tuple[ViTConfig | None, str]:
    """A ViTConfig, a registry name, a dict, or a path to a YAML/JSON file (a DINOv2/CheXFound SSL config,
    a Hugging Face config.json or a ViTConfig dict) -> (ViTConfig or None, where it came from)."""
    if config is None:
        return None, ""
    if isinstance(config, ViTConfig):
        return config, "argument"
    if isinstance(config, Mapping):
        return _config_from_mapping(dict(config), "config argument"), "argument"
    s = str(config)
    if s in list_configs():
        return get_config(s), f"registry:{s}"
    p = Path(s)
    if not p.is_file():
        raise ConfigError(p, f"neither a named config ({', '.join(list_configs())}) nor a config file")
    d = read_json(p) if p.suffix.lower() == ".json" else read_yaml(p)
    preprocessor = _hf_preprocessor(p.parent) if p.suffix.lower() == ".json" else None
    return _config_from_mapping(d, p, preprocessor), str(p)


def _config_from_mapping(d: dict[str, Any], source: str | Path, preprocessor: dict[str, Any] | None = None) -> ViTConfig:
    if is_dinov2_ssl_config(d):
        return config_from_dinov2_yaml(d, source)
    if "model_type" in d:
        return config_from_hf(d, source, preprocessor)
    known = {f.name for f in fields(ViTConfig)}
    if set(d) <= known:
        try:
            return ViTConfig.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ConfigError(source, str(e)) from e
    raise ConfigError(source, "not a ViTConfig, a DINOv2/CheXFound SSL config (student: ...) or a Hugging Face "
                              "config.json (model_type: ...)")


def _hf_preprocessor(folder: Path) -> dict[str, Any] | None:
    p = folder / "preprocessor_config.json"
    return read_json(p) if p.is_file() else None


def _resolve_path(path: Path) -> Path:
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "teacher_checkpoint.pth"):
            if (path / name).is_file():
                return path / name
        cands = sorted(q for q in path.iterdir() if q.suffix in (".safetensors", ".pth", ".pt", ".bin"))
        if len(cands) == 1:
            return cands[0]
        raise CheckpointError(path, f"folder holds {len(cands)} candidate weight files; name one of them. {SUPPORTED}")
    if not path.exists():
        raise CheckpointError(path, "file not found")
    return path


def _read_raw(p: Path) -> RawStateDict | None:
    """Foreign tensors of `p`, or None when it is our own format."""
    kind = sniff(p)
    if kind == "empty":
        raise CheckpointError(p, "file is empty")
    if kind == "safetensors":
        _, smeta = read_safetensors_meta(p)
        if META_KEY in smeta:
            return None
        tensors, _ = read_safetensors(p)
        return unwrap_state_dict(tensors, p)
    if kind in ("torch-zip", "torch-legacy"):
        return unwrap_state_dict(load_weights_only(p), p)
    if kind == "npz":
        raise CheckpointError(p, f"this is a NumPy .npz archive (a features file?), not model weights; {SUPPORTED}")
    raise CheckpointError(p, f"this is {kind}, not a model checkpoint; {SUPPORTED}")


def read_foreign(p: Path, raw: RawStateDict) -> tuple[str, Filtered, ViTConfig | None, str, tuple[str, ...]]:
    """-> (format, filtered tensors, config the files carry or None, its source, optional keys)."""
    keys = list(raw.tensors)
    if looks_hf(keys):
        filt = filter_hf_dinov2(raw.tensors, p)
        cj = p.parent / "config.json"
        hf_cfg = read_json(cj) if cj.is_file() else None
        cfg = config_from_hf(hf_cfg, cj, _hf_preprocessor(p.parent)) if hf_cfg else None
        optional = () if hf_uses_mask_token(hf_cfg) else ("mask_token",)
        return "hf_dinov2", filt, cfg, str(cj) if cfg else "", optional
    if any(k.endswith("patch_embed.proj.weight") for k in keys):
        yaml_path = find_release_config(p)
        if looks_official(keys, raw.wrapper) or yaml_path is not None:
            filt = filter_chexfound_official(raw.tensors, p)
            cfg = config_from_dinov2_yaml(read_yaml(yaml_path), yaml_path) if yaml_path else None
            return "chexfound_official", filt, cfg, str(yaml_path or ""), ()
        return "dinov2", filter_dinov2(raw.tensors, p), None, "", ()
    raise CheckpointError(p, f"this is {describe_state_dict(keys)}; {SUPPORTED}")


def _defaults_for(fmt: str, cfg: ViTConfig) -> ViTConfig:
    """Settings tensors cannot show, by format, when no config and no named config matches."""
    if fmt == "chexfound_official":
        return replace(cfg, interpolate_offset=0.1, interpolate_antialias=False, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, minmax_rescale=True)
    if fmt == "hf_dinov2":
        return replace(cfg, interpolate_offset=0.0, interpolate_antialias=cfg.num_register_tokens > 0,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, minmax_rescale=False)
    # DINOv2 hub models: registers -> size-based antialiased resize; without -> the 0.1 offset kludge.
    reg = cfg.num_register_tokens > 0
    return replace(cfg, interpolate_offset=0.0 if reg else 0.1, interpolate_antialias=reg,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD, minmax_rescale=False)


def load_backbone(
    path: str | PathLike[str], config: ConfigLike = None, *, head_dim: int = 64
) -> tuple[VisionTransformer, dict[str, Any]]:
    """Load any supported backbone file (or a folder holding one) -> (model in eval mode, meta).

    `config` (optional): a ViTConfig, registry name, dict or YAML/JSON path; otherwise the config stored
    with the weights (our metadata, the release's config.yaml, HF config.json) or, failing that, the
    architecture inferred from the tensors (`head_dim` gives the number of heads).
    """
    from chexfound.data.transform import InputTransform
    from chexfound.models.ours import load_ours

    p = _resolve_path(Path(path))
    explicit, explicit_src = resolve_config(config)
    raw = _read_raw(p)
    if raw is None:
        model, meta = load_ours(p, explicit)
        meta["config_source"] = explicit_src or "file metadata"
        return model, meta

    fmt, filt, file_cfg, file_src, optional = read_foreign(p, raw)
    if explicit is not None:
        cfg, cfg_src = explicit, explicit_src
    elif file_cfg is not None:
        cfg, cfg_src = file_cfg, file_src
    else:
        try:
            inferred = infer_config(filt.backbone, p, head_dim)
        except CheckpointError as e:
            raise CheckpointError(p, f"{e.reason}; {ARCHITECTURES}") from e
        name = None if fmt == "hf_dinov2" else match_registry(
            inferred, prefer="chexfound" if fmt == "chexfound_official" else "dinov2")
        if name:
            cfg, cfg_src = complete_from_registry(inferred, name), f"inferred from tensors; settings of {name}"
        else:
            cfg, cfg_src = _defaults_for(fmt, inferred), f"inferred from tensors; {fmt} defaults"
    model, warns = load_backbone_strict(cfg, filt.backbone, p, optional)
    heads = filt.heads
    meta: dict[str, Any] = {
        "kind": "backbone",
        "format": fmt,
        "source": str(p),
        "config": model.cfg.to_dict(),
        "config_source": cfg_src,
        "transform": InputTransform.for_backbone(model.cfg).to_dict(),
        "weights_sha256": state_dict_sha256(model.state_dict()),
        "heads": heads,
        "ignored": raw.ignored + filt.ignored,
        "notes": ([f"unwrapped {'/'.join(raw.wrapper)}"] if raw.wrapper else []) + filt.notes,
        "warnings": warns,
        "source_dtypes": tensor_dtypes(filt.backbone),
    }
    for h, sd in heads.items():
        log.info("%s: kept head %r (%d tensors) in meta['heads']", p, h, len(sd))
    if meta["ignored"]:
        log.info("%s: not loaded: %s", p, "; ".join(meta["ignored"][:8]))
    return model, meta
