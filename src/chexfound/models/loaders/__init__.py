"""`load_file(path, config=None)`: any supported backbone file -> VisionTransformer carrying `model.info`.

(`chexfound.models.create_backbone(path)` is the public entry; `load_backbone` is its deprecated
predecessor that returned `(model, meta dict)`.)

Formats (detected from the file, not its name):
- chexfound: our safetensors (config + transform in the metadata),
- chexfound_hub: the official CheXFound weights as the Hugging Face Hub publishes them (`model.safetensors`,
  `model.`-prefixed teacher backbone keys; `config.json` beside it),
- chexfound_official: CheXFound `teacher_checkpoint.pth` ({"teacher": ...}, backbone./dino_head./ibot_head.
  prefixes, chunked or flat blocks) with `config.yaml` when given or found beside it,
- dinov2: original DINOv2 `.pth` state dicts,
- hf_dinov2: Hugging Face Dinov2Model / Dinov2WithRegistersModel (model.safetensors or pytorch_model.bin,
  config.json and preprocessor_config.json beside it).
The file's kind comes from its bytes (zip/pickle magic or a safetensors header), never its name.
Loading is strict for the backbone (missing or unexpected keys -> CheckpointError listing them); a different
position-embedding grid is resized with a warning; heads in the file are kept in `model.info.heads`.
The architecture comes from, in order: the `config` argument; the file (our metadata, the `chexfound` entry
of our torch exports, the release's or our run's config.yaml beside it, a Hugging Face config.json); the
tensors plus a head count given as `num_heads`/`head_dim`, or that of a released architecture with exactly
these tensors. Nothing is guessed: otherwise the error lists the ways to say it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import fields, replace
from os import PathLike
from pathlib import Path
from typing import Any

from chexfound.errors import CheckpointError, ConfigError
from chexfound.models.config import IMAGENET_MEAN, IMAGENET_STD, ViTConfig
from chexfound.models.format import META_KEY, state_dict_sha256
from chexfound.models.info import ModelInfo, attach_info, origin_from_file_meta
from chexfound.models.loaders.describe import ARCHITECTURES, SUPPORTED, describe_state_dict
from chexfound.models.loaders.files import (describe_kind, load_weights_only, read_json, read_safetensors,
                                            read_safetensors_meta, sniff, suffix_mismatch)
from chexfound.models.loaders.hf import config_from_hf, filter_hf_dinov2, hf_uses_mask_token, looks_hf
from chexfound.models.loaders.hub_layout import config_json_heads, filter_chexfound_hub, looks_chexfound_hub
from chexfound.models.loaders.infer import complete_from_registry, infer_config, match_registry, same_architecture
from chexfound.models.loaders.keys import Filtered, RawStateDict, tensor_dtypes, unwrap_state_dict
from chexfound.models.loaders.official import (
    config_from_ssl_yaml,
    filter_chexfound_official,
    filter_dinov2,
    find_release_config,
    is_dinov2_ssl_config,
    looks_official,
    read_yaml,
)
from chexfound.models.loaders.strict import load_backbone_strict
from chexfound.models.loaders.run_config import is_run_config
from chexfound.models.registry import RELEASED, get_config, list_configs
from chexfound.models.vit import VisionTransformer

log = logging.getLogger(__name__)

__all__ = ["SUPPORTED", "foreign_architecture", "load_backbone", "load_file", "resolve_config", "read_foreign"]

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
    if is_run_config(d) or is_dinov2_ssl_config(d):
        return config_from_ssl_yaml(d, source)
    if "model_type" in d:
        return config_from_hf(d, source, preprocessor)
    known = {f.name for f in fields(ViTConfig)}
    if set(d) <= known:
        try:
            return ViTConfig.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ConfigError(source, str(e)) from e
    raise ConfigError(source, "not a ViTConfig, a chexfound pretraining config.yaml (student.arch + overrides), a "
                              "DINOv2/CheXFound SSL config (student: ...) or a Hugging Face config.json "
                              "(model_type: ...)")


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


def _read_raw(p: Path) -> tuple[RawStateDict | None, str]:
    """(foreign tensors of `p` or None when it is our own format, the kind its bytes say it is)."""
    kind = sniff(p)
    if kind == "empty":
        raise CheckpointError(p, "file is empty")
    if kind == "safetensors":
        _, smeta = read_safetensors_meta(p)
        if META_KEY in smeta:
            return None, kind
        tensors, _ = read_safetensors(p)
        return unwrap_state_dict(tensors, p), kind
    if kind in ("torch-zip", "torch-legacy"):
        obj = load_weights_only(p)
        embedded = None
        if isinstance(obj, Mapping) and isinstance(obj.get(META_KEY), Mapping):
            obj = dict(obj)
            embedded = dict(obj.pop(META_KEY))
        raw = unwrap_state_dict(obj, p)
        raw.embedded = embedded
        return raw, kind
    if kind == "npz":
        raise CheckpointError(p, f"this is a NumPy .npz archive (a features file?), not model weights; {SUPPORTED}")
    raise CheckpointError(p, f"this is {describe_kind(kind)}, not a model checkpoint; {SUPPORTED}")


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
    if looks_chexfound_hub(keys):
        # Its config.json is of no schema we know: the architecture comes from the tensors (`_count_heads`).
        return "chexfound_hub", filter_chexfound_hub(raw.tensors, p), None, "", ()
    if any(k.endswith("patch_embed.proj.weight") for k in keys):
        yaml_path = find_release_config(p)
        official = looks_official(keys, raw.wrapper) or yaml_path is not None
        filt = filter_chexfound_official(raw.tensors, p) if official else filter_dinov2(raw.tensors, p)
        fmt = "chexfound_official" if official else "dinov2"
        if raw.embedded is not None:
            return fmt, filt, _embedded_config(p, raw.embedded), f"{p.name} (its {META_KEY} entry)", ()
        cfg = config_from_ssl_yaml(read_yaml(yaml_path), yaml_path) if yaml_path else None
        return fmt, filt, cfg, str(yaml_path or ""), ()
    raise CheckpointError(p, f"this is {describe_state_dict(keys)}; {SUPPORTED}")


def _embedded_config(p: Path, entry: dict[str, Any]) -> ViTConfig:
    try:
        return ViTConfig.from_dict(entry["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(p, f"invalid config in the file's {META_KEY} entry ({e})") from e


def _defaults_for(fmt: str, cfg: ViTConfig) -> ViTConfig:
    """Settings tensors cannot show, by format, when no config and no named config matches."""
    if fmt in ("chexfound_official", "chexfound_hub"):
        return replace(cfg, interpolate_offset=0.1, interpolate_antialias=False, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, minmax_rescale=True)
    if fmt == "hf_dinov2":
        return replace(cfg, interpolate_offset=0.0, interpolate_antialias=cfg.num_register_tokens > 0,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, minmax_rescale=False)
    # DINOv2 hub models: registers -> size-based antialiased resize; without -> the 0.1 offset kludge.
    reg = cfg.num_register_tokens > 0
    return replace(cfg, interpolate_offset=0.0 if reg else 0.1, interpolate_antialias=reg,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD, minmax_rescale=False)


def _count_heads(sd: dict[str, Any], p: Path, fmt: str, num_heads: int | None,
                 head_dim: int | None) -> tuple[ViTConfig, str]:
    """The architecture from the tensors, with a head count that was given or is that of a released model
    with exactly these tensors. Tensors cannot show it, so it is never assumed: otherwise say how to give it."""
    try:
        shape = infer_config(sd, p, head_dim=1)  # everything but the head count (1-wide heads always divide)
    except CheckpointError as e:
        raise CheckpointError(p, f"{e.reason}; {ARCHITECTURES}") from e
    dim = shape.embed_dim
    if num_heads is not None or head_dim is not None:
        if num_heads is not None and head_dim is not None and num_heads * head_dim != dim:
            raise ConfigError(None, f"num_heads {num_heads} x head_dim {head_dim} != embed dim {dim} of {p}")
        n = num_heads if num_heads is not None else dim // int(head_dim or 1)
        if n < 1 or dim % n or (head_dim is not None and dim % head_dim):
            raise ConfigError(None, f"{p}: embed dim {dim} does not split into "
                                    + (f"{num_heads} heads" if num_heads is not None else f"heads of width {head_dim}"))
        return replace(shape, num_heads=n), f"{n} heads as given"
    # The Hub layout is CheXFound's own: only its published shapes say which model it is.
    candidates = [n for n in RELEASED if fmt != "chexfound_hub" or n.startswith("chexfound")]
    released = sorted(n for n in candidates
                      if same_architecture(replace(shape, num_heads=get_config(n).num_heads), get_config(n)))
    counts = {get_config(n).num_heads for n in released}
    said = config_json_heads(p, dim, shape.depth) if fmt == "chexfound_hub" else None
    if len(counts) == 1:
        n = counts.pop()
        if said is not None and said[0] != n:
            msg = (f"{p}: config.json says {said[0]} heads, but the tensors are the published {released[0]} "
                   f"shapes ({n} heads); the tensors win")
            warnings.warn(msg, UserWarning, stacklevel=4)
            log.warning("%s", msg)
        return replace(shape, num_heads=n), f"{n} heads of the released {released[0]} architecture"
    if said is not None:
        return replace(shape, num_heads=said[0]), said[1]
    divisors = [h for h in (64, 32, 128, 16) if dim % h == 0]
    hint = f" (a head width of {divisors[0]}: {dim // divisors[0]} heads)" if divisors else ""
    published = ("it is not the published CheXFound ViT-L/16 (24 blocks of width 1024, 4 registers, SwiGLU), "
                 "whose shapes alone say 16 heads; " if fmt == "chexfound_hub" else "")
    raise CheckpointError(p, published + (
        f"the number of attention heads cannot be read from this {fmt} checkpoint: it carries no config, no "
        f"config.yaml / config.json lies beside it, and no released architecture has these tensors "
        f"(dim {dim}, depth {shape.depth}, patch {shape.patch_size}, {shape.num_register_tokens} registers, "
        f"{shape.ffn_layer}). Say which model it is: the head count (num_heads=N / --num-heads N), the head "
        f"width (head_dim=D / --head-dim D{hint}), or its architecture (config= / --arch: a named config such as "
        f"{', '.join(list_configs()[:4])}, ..., a pretraining run's config.yaml, or a DINOv2 / Hugging Face config "
        "file)"))


def _check_given_heads(cfg: ViTConfig, where: str, num_heads: int | None, head_dim: int | None, p: Path) -> None:
    """A head count given for a file that records its own must agree with it (never silently ignored)."""
    given = num_heads if num_heads is not None else (cfg.embed_dim // head_dim if head_dim else None)
    if given is not None and given != cfg.num_heads:
        raise ConfigError(None, f"{p}: {given} attention heads given, but {where} says {cfg.num_heads}")


def foreign_architecture(
    p: Path, fmt: str, filt: Filtered, explicit: tuple[ViTConfig | None, str], file_cfg: tuple[ViTConfig | None, str],
    num_heads: int | None = None, head_dim: int | None = None,
) -> tuple[ViTConfig, str]:
    """The architecture of a foreign file's mapped tensors -> (config, where it came from): the caller's config,
    else the file's, else the tensors with a head count given or identified (`_count_heads`)."""
    if explicit[0] is not None:
        cfg, cfg_src = explicit
    elif file_cfg[0] is not None:
        cfg, cfg_src = file_cfg
    else:
        inferred, heads_src = _count_heads(filt.backbone, p, fmt, num_heads, head_dim)
        name = None if fmt == "hf_dinov2" else match_registry(
            inferred, prefer="chexfound" if fmt in ("chexfound_official", "chexfound_hub") else "dinov2")
        if fmt == "chexfound_hub" and name and not name.startswith("chexfound"):
            name = None  # CheXFound's layout: its settings (offset 0.1, min-max), not another model's
        if name:
            cfg = complete_from_registry(inferred, name)
            cfg_src = f"inferred from tensors ({heads_src}); settings of {name}"
        else:
            cfg, cfg_src = _defaults_for(fmt, inferred), f"inferred from tensors ({heads_src}); {fmt} defaults"
    _check_given_heads(cfg, cfg_src, num_heads, head_dim, p)
    if not cfg.name:
        cfg = replace(cfg, name=p.parent.name if fmt == "hf_dinov2" else p.stem)
    return cfg, cfg_src  # type: ignore[return-value]


def load_file(
    path: str | PathLike[str], config: ConfigLike = None, *, num_heads: int | None = None,
    head_dim: int | None = None,
) -> VisionTransformer:
    """Load any supported backbone file (or a folder holding one) -> model in eval mode with `model.info`.

    `config` (optional): a ViTConfig, registry name, dict or YAML/JSON path that overrides what the file says.
    `num_heads` / `head_dim`: the head count of a checkpoint that carries no config (see `_count_heads`).
    """
    from chexfound.data.transform import InputTransform
    from chexfound.models.ours import load_ours
    from chexfound.models.shards import find_shards, load_shards_as_backbone

    explicit, explicit_src = resolve_config(config)
    shards = find_shards(path)
    if shards:  # a folder of `<prefix>.NN-of-NN.safetensors` (or one of them): the set, reassembled
        model = load_shards_as_backbone(Path(path), shards, explicit)
        _check_given_heads(model.cfg, "its metadata", num_heads, head_dim, Path(path))
        return model
    p = _resolve_path(Path(path))
    raw, kind = _read_raw(p)
    mismatch = suffix_mismatch(p, kind)
    if mismatch:
        log.warning("%s", mismatch)
    if raw is None:
        model, _ = load_ours(p, explicit)
        info: ModelInfo = model.info  # type: ignore[assignment]
        _check_given_heads(info.config, "its metadata", num_heads, head_dim, p)
        info.config_source = explicit_src or "file metadata"
        info.notes += [mismatch] if mismatch else []
        return model

    fmt, filt, file_cfg, file_src, optional = read_foreign(p, raw)
    cfg, cfg_src = foreign_architecture(p, fmt, filt, (explicit, explicit_src), (file_cfg, file_src),
                                        num_heads, head_dim)
    model, warns = load_backbone_strict(cfg, filt.backbone, p, optional, filt.file_key)
    embedded = raw.embedded if (raw.embedded is not None and explicit is None) else None
    transform = InputTransform.for_backbone(model.cfg)
    if embedded is not None and isinstance(embedded.get("transform"), Mapping):
        transform = InputTransform.from_dict(dict(embedded["transform"]))
    info = ModelInfo(
        name=model.cfg.name, config=model.cfg, transform=transform,
        weights_sha256=state_dict_sha256(model.state_dict()), source=str(p), format=fmt, config_source=cfg_src,
        origin=origin_from_file_meta(embedded) if embedded is not None else {}, heads=filt.heads,
        ignored=raw.ignored + filt.ignored,
        notes=([mismatch] if mismatch else []) + ([f"unwrapped {'/'.join(raw.wrapper)}"] if raw.wrapper else [])
        + filt.notes,
        warnings=warns, source_dtypes=tensor_dtypes(filt.backbone))
    if embedded is not None and embedded.get("weights_sha256") not in (None, info.weights_sha256):
        raise CheckpointError(p, f"weights do not match the SHA-256 recorded in the file's {META_KEY} entry "
                                 f"({str(embedded['weights_sha256'])[:12]}... vs {info.weights_sha256[:12]}...)")
    for h, sd in filt.heads.items():
        log.info("%s: kept head %r (%d tensors) in model.info.heads", p, h, len(sd))
    if info.ignored:
        log.info("%s: not loaded: %s", p, "; ".join(info.ignored[:8]))
    return attach_info(model, info)  # type: ignore[return-value]


def load_backbone(
    path: str | PathLike[str], config: ConfigLike = None, *, head_dim: int | None = None,
    num_heads: int | None = None,
) -> tuple[VisionTransformer, dict[str, Any]]:
    """Deprecated: use `chexfound.models.create_backbone(path)`, whose model carries `model.info` (a typed
    ModelInfo) instead of this untyped meta dict. Returns (model in eval mode, `model.info.to_meta()`)."""
    warnings.warn("chexfound.models.load_backbone(path) is deprecated: use chexfound.models.create_backbone(path); "
                  "the model carries its config, transform and hash as model.info", DeprecationWarning, stacklevel=2)
    model = load_file(path, config, num_heads=num_heads, head_dim=head_dim)
    return model, model.info.to_meta()  # type: ignore[union-attr]
