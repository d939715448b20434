"""Where a pretraining run's weights start (`train.init_from`, `chexfound pretrain --init-from SOURCE`).

SOURCE is one of:
- one of our runs: its folder (the last checkpoint in `ckpt/`) or a `ckpt/ckpt_*.pt`: student and teacher,
  backbones and DINO/iBOT heads, as that run left them, so a new stage goes on from there;
- a training-side checkpoint in the original layout: the CheXFound release's `teacher_checkpoint.pth`
  ({"teacher": backbone + DINO/iBOT heads}; student and teacher both start from it, as do the heads) or
  DINOv2's `model_checkpoint.pth` ({"model": student.* + teacher.*});
- a backbone any loader reads (`chexfound.models.create_backbone`: our safetensors, a DINOv2 `.pth`, a Hugging
  Face folder, a hub id): student and teacher backbones start from it, the heads are freshly initialised.

When the global crop size differs from the source's, the patch-grid part of `pos_embed` is resized as the
backbone resizes it at run time (`chexfound.models.vit.resize_pos_embed`: bicubic with the DINO offset; our
choice, the original deleted it and re-initialised: `train.pos_embed_on_resize=reinit`). Checkpoint layouts are
read by `chexfound.models.loaders.keys.training_state_sides`.
The source's architecture must be the run's (`student.arch` + `student.overrides`): a mismatch is an error
that names both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from chexfound.errors import CheckpointError, ConfigError
from chexfound.models.config import ViTConfig
from chexfound.models.filekind import sniff
from chexfound.models.format import META_KEY
from chexfound.models.loaders.keys import training_state_sides
from chexfound.models.vit import resize_pos_embed
from chexfound.ssl.checkpoint import latest_checkpoint, load_checkpoint

# ViTConfig fields that make two backbones different models (img_size is not: pos_embed is resized).
_ARCH_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "num_register_tokens",
                "ffn_layer", "qkv_bias", "proj_bias", "ffn_bias", "norm_eps", "interpolate_offset",
                "interpolate_antialias")


@dataclass
class InitSource:
    """The weights a run starts from: {"student": sd, "teacher": sd}, keys as `SSLModel.state_dict()`
    (`backbone.*`, `dino_head.*`, `ibot_head.*`)."""

    source: str
    kind: str  # "run checkpoint", "original layout", "backbone"
    weights: dict[str, dict[str, Tensor]]
    config: ViTConfig | None  # the source's architecture where it records one (else only its shapes are known)
    has_heads: bool

    def describe(self) -> str:
        heads = "with its DINO/iBOT heads" if self.has_heads else "backbone only: DINO/iBOT heads freshly initialised"
        return f"starting from {self.source} ({self.kind}; {heads})"


def _local(source: str | Path) -> Path | None:
    """The local path of SOURCE, or None for an id a resolver handles (`hf://...`)."""
    s = str(source)
    if "://" in s:
        return None
    from chexfound.ssl.config import expand_path

    return expand_path(s)


def resolve_init_source(source: str | Path) -> InitSource:
    """Read SOURCE (see the module docstring) without unpickling anything foreign."""
    path = _local(source)
    if path is not None and path.is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is not None:
            return _from_checkpoint(ckpt, str(source))
        if (path / "teacher_checkpoint.pth").is_file() and (path / "config.yaml").is_file():
            return _from_checkpoint(path / "teacher_checkpoint.pth", str(source))
    elif path is not None and path.is_file() and sniff(path) in ("torch-zip", "torch-legacy"):
        obj = load_checkpoint(path)
        if isinstance(obj.get("model"), dict) or isinstance(obj.get("teacher"), dict):
            return _from_checkpoint(path, str(source), obj)
        del obj  # a bare backbone state dict: the loaders know its layouts
    elif path is not None and not path.exists():
        from chexfound.models.registry import list_configs

        if str(source) in list_configs():
            raise ConfigError(None, f"--init-from {source}: a named architecture has no weights to start from; give a "
                                    "checkpoint, a backbone file or a run folder (the architecture is the preset's)")
    # files, folders, ids and short names the model resolver knows (it names what it refuses)
    return _from_backbone(str(source), path if path is not None and path.exists() else str(source))


def check_source_exists(source: str | Path) -> None:
    """Before any work: a SOURCE written as a local file or folder must be there (ids and names are resolved
    later, by the model resolver)."""
    path = _local(source)
    looks_local = path is not None and ("/" in str(source) or path.suffix in (".pth", ".pt", ".safetensors", ".bin"))
    if looks_local and path is not None and not path.exists():
        raise ConfigError(path, "--init-from: no such file or folder")


def _from_checkpoint(path: Path, source: str, obj: dict[str, Any] | None = None) -> InitSource:
    obj = obj if obj is not None else load_checkpoint(path)
    kind = "run checkpoint" if isinstance(obj.get("model"), dict) else "original layout"
    weights = training_state_sides(obj, path)
    if not any(k.startswith("backbone.") for k in weights["teacher"]):
        raise CheckpointError(path, "the checkpoint holds no backbone.* weights")
    has_heads = any(k.startswith(("dino_head.", "ibot_head.")) for k in weights["teacher"])
    return InitSource(source, kind, weights, _recorded_config(path, obj), has_heads)


def _recorded_config(path: Path, obj: dict[str, Any]) -> ViTConfig | None:
    """The architecture the checkpoint records: our exports carry it under META_KEY, our run folders in
    `ckpt_<i>.yaml` (the release's `teacher_checkpoint.pth` records none: its shapes are checked instead)."""
    meta = obj.get(META_KEY)
    if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
        return ViTConfig.from_dict(meta["config"])
    run_cfg = path.with_suffix(".yaml")  # our ckpt_<i>.pt has its resolved config beside it
    if path.suffix == ".pt" and run_cfg.is_file():
        try:
            import yaml

            from chexfound.ssl.meta_arch import backbone_config

            return backbone_config(yaml.safe_load(run_cfg.read_text()), drop_path=False)
        except (KeyError, TypeError, ValueError, AttributeError, ConfigError, OSError):
            return None  # not one of our run configs: the shapes are checked instead
    return None


def _from_backbone(source: str, where: str | Path) -> InitSource:
    from chexfound.models import create_backbone

    model = create_backbone(where)
    info = model.info
    if info.format == "random":
        raise ConfigError(None, f"--init-from {source}: a named architecture has no weights to start from")
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    for name, hsd in info.heads.items():
        if name in ("dino_head", "ibot_head"):
            sd.update({f"{name}.{k}": v for k, v in hsd.items()})
    has_heads = any(k.startswith(("dino_head.", "ibot_head.")) for k in sd)
    return InitSource(source, f"backbone, {info.format}", {"student": sd, "teacher": dict(sd)}, info.config,
                      has_heads)


def _shape_facts(sd: dict[str, Tensor]) -> dict[str, Any]:
    """What a backbone state dict says of its architecture (the head count cannot be read from shapes)."""
    depth = len({k.split(".")[2] for k in sd if k.startswith("backbone.blocks.")})
    facts: dict[str, Any] = {"depth": depth}
    if "backbone.cls_token" in sd:
        facts["embed_dim"] = int(sd["backbone.cls_token"].shape[-1])
    if "backbone.patch_embed.proj.weight" in sd:
        facts["patch_size"] = int(sd["backbone.patch_embed.proj.weight"].shape[-1])
    reg = sd.get("backbone.register_tokens")
    facts["num_register_tokens"] = int(reg.shape[1]) if reg is not None else 0
    facts["ffn_layer"] = "swiglu" if any(".mlp.w12." in k for k in sd) else "mlp"
    return facts


def _describe(facts: dict[str, Any], name: str = "") -> str:
    parts = [f"{k}={facts[k]}" for k in ("embed_dim", "depth", "num_heads", "patch_size", "num_register_tokens",
                                          "ffn_layer", "mlp_ratio") if k in facts]
    return (f"{name} " if name else "") + "(" + ", ".join(parts) + ")"


def check_architecture(src: InitSource, run: ViTConfig) -> list[str]:
    """Raise when the source is another architecture than the run's (the error names both); returns notes."""
    mine = {f.name: getattr(run, f.name) for f in fields(run) if f.name in _ARCH_FIELDS}
    if src.config is not None:
        theirs = {f.name: getattr(src.config, f.name) for f in fields(src.config) if f.name in _ARCH_FIELDS}
        what = f"the source is {src.config.name or 'unnamed'}"
        notes = []
    else:
        theirs = _shape_facts(src.weights["teacher"])
        what = "the source's shapes say"
        notes = [f"the source records no architecture: its shapes match, and num_heads={run.num_heads} (the "
                 "run's) is assumed (shapes cannot tell the head count)"]
    differ = sorted(k for k in theirs if k in mine and theirs[k] != mine[k])
    if differ:
        raise ConfigError(None, f"--init-from {src.source}: {what} {_describe(theirs)}, this run's "
                                f"backbone is {_describe(mine, run.name)}; they differ in {', '.join(differ)}. "
                                "Choose the preset of the source's architecture (student.arch / student.overrides)")
    return notes


# -- stage initialisation (progressive resolution, continued pretraining) ---------------------------
def _resize_pos(module: nn.Module, pos: Tensor, new_grid: int) -> Tensor:
    """The one position-embedding resize (`chexfound.models.vit.resize_pos_embed`), with the DINO offset and
    antialias setting of the backbone it goes into; in the checkpoint's dtype."""
    cfg = getattr(getattr(module, "backbone", None), "cfg", None) or ViTConfig()
    n = pos.shape[1] - 1
    if math.isqrt(n) ** 2 != n:
        raise CheckpointError(None, f"pos_embed with {n} patch positions is not a square grid")
    return resize_pos_embed(pos, (new_grid, new_grid), cfg.interpolate_offset,
                            cfg.interpolate_antialias).to(pos.dtype)


def _load(module: nn.Module, sd: dict[str, Tensor]) -> None:
    """Load full (unsharded) tensors of `module`'s own keys, `strict=False` (absent heads keep their fresh
    values); under FSDP2 each rank takes its shard of them (every rank calls this)."""
    if any(hasattr(p, "to_local") for p in module.parameters()):  # DTensor parameters: FSDP2
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        module.load_state_dict(sd, strict=False)


def init_from_checkpoint(student: nn.Module, teacher: nn.Module, path: str | Path, pos_mode: str) -> list[str]:
    """Start student and teacher from `path` (`chexfound.ssl.init_source`: an earlier run or stage, the
    original layout, or any backbone): backbones, and heads where the source has them and shapes match;
    returns notes for the log. The architecture must be the run's."""
    src = resolve_init_source(path)
    p = Path(str(path)) if "://" not in str(path) else None
    notes = [src.describe()]
    run_cfg = getattr(getattr(teacher, "backbone", None), "cfg", None)
    if run_cfg is not None:
        notes += check_architecture(src, run_cfg)
    weights = src.weights
    for side, module in (("student", student), ("teacher", teacher)):
        own = module.state_dict()
        sd = dict(weights[side])
        if "backbone.pos_embed" in sd and sd["backbone.pos_embed"].shape != own["backbone.pos_embed"].shape:
            if pos_mode == "reinit":
                del sd["backbone.pos_embed"]
                notes.append(f"{side}: pos_embed re-initialised (resolution changed)")
            else:
                new_grid = int(math.isqrt(own["backbone.pos_embed"].shape[1] - 1))
                sd["backbone.pos_embed"] = _resize_pos(module, sd["backbone.pos_embed"], new_grid)
                notes.append(f"{side}: pos_embed interpolated to a {new_grid}x{new_grid} grid")
        for k in [k for k in sd if k in own and sd[k].shape != own[k].shape]:
            if k.startswith("backbone."):
                raise CheckpointError(p, f"{side} {k}: shape {tuple(sd[k].shape)} != {tuple(own[k].shape)}")
            notes.append(f"{side}: {k} not loaded (shape {tuple(sd[k].shape)} != {tuple(own[k].shape)})")
            del sd[k]
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        _load(module, {k: v for k, v in sd.items() if k in own})
        reinit_pos = pos_mode == "reinit"
        bad = [k for k in missing if k.startswith("backbone.") and not (k == "backbone.pos_embed" and reinit_pos)]
        if bad or [k for k in unexpected if k.startswith("backbone.")]:
            raise CheckpointError(p, f"{side} backbone keys do not match: missing {bad}, unexpected {unexpected}")
        fresh = sorted({k.split(".")[0] for k in missing if not k.startswith("backbone.")})
        if fresh:
            notes.append(f"{side}: {', '.join(fresh)} freshly initialised ({len(missing)} tensor(s))")
        unused = sorted({k.split(".")[0] for k in unexpected})
        if unused:
            notes.append(f"{side}: the source's {', '.join(unused)} not used (this recipe has no such head)")
    return notes
