"""Training checkpoints (atomic, keep-last-k, exact resume), teacher exports, and stage initialisation.

Layout of a run folder:
  ckpt/ckpt_<iteration>.pt     {"iteration" (next to run), "model", "optimizer", "scaler", "state"} (torch.save,
                                read back with weights_only=True); written to a temp file, fsynced, renamed
  ckpt/ckpt_<iteration>.yaml   the resolved config of that checkpoint
  teacher_backbone.safetensors our format (chexfound.models.save_backbone): config + input transform in meta
  teacher_checkpoint.pth       the original CheXFound layout {"teacher": {backbone.blocks.<chunk>.<i>...,
                                dino_head..., ibot_head...}} so the original tools can read it

Progressive resolution (`train.init_from`): a stage starts from the previous stage's weights; when the global
crop size changed, the patch-grid part of `pos_embed` is resized bicubically (our choice; the original
deleted it and re-initialised, available as `train.pos_embed_on_resize=reinit`).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chexfound.errors import CheckpointError
from chexfound.models import VisionTransformer, save_backbone
from chexfound.runio import atomic_output, atomic_write_bytes
from chexfound.ssl.config import dump_config

log = logging.getLogger(__name__)

CKPT_DIR = "ckpt"
_CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ck = list_checkpoints(run_dir)
    return ck[-1][1] if ck else None


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(run_dir: str | Path, iteration: int, payload: dict[str, Any], cfg: dict[str, Any],
                    keep_last: int) -> Path:
    d = Path(run_dir) / CKPT_DIR
    path = d / f"ckpt_{iteration:08d}.pt"
    atomic_write_bytes(d / f"ckpt_{iteration:08d}.yaml", dump_config(cfg).encode())
    _atomic_torch_save({"iteration": iteration, **payload}, path)
    if keep_last > 0:
        for it, p in list_checkpoints(run_dir)[:-keep_last]:
            p.unlink(missing_ok=True)
            p.with_suffix(".yaml").unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle with foreign classes, ...
        raise CheckpointError(p, f"cannot read checkpoint ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(p, "not a checkpoint dictionary")
    return obj


# -- full state of a possibly sharded model ---------------------------------------------------------
def full_model_state(model: nn.Module, sharded: bool) -> dict[str, Tensor]:
    """CPU state dict; under FSDP2 a collective (every rank must call it)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict[str, Tensor],
                    optim_sd: dict[str, Any] | None, sharded: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=opts)
        if optimizer is not None and optim_sd is not None:
            set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        return
    model.load_state_dict(model_sd)
    if optimizer is not None and optim_sd is not None:
        optimizer.load_state_dict(optim_sd)


# -- exports ---------------------------------------------------------------------------------------
def teacher_backbone_from_state(model_sd: dict[str, Tensor], vit_config: Any) -> VisionTransformer:
    vit = VisionTransformer(vit_config)
    prefix = "teacher.backbone."
    sd = {k[len(prefix):]: v for k, v in model_sd.items() if k.startswith(prefix)}
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(None, f"teacher backbone keys do not match: missing {missing}, unexpected {unexpected}")
    return vit.eval()


def original_teacher_layout(model_sd: dict[str, Tensor], depth: int, block_chunks: int) -> dict[str, Any]:
    """{"teacher": ...} with the original's key names; blocks chunked as `blocks.<chunk>.<i>.` when
    `block_chunks` divides the depth (the released training runs used 4), flat `blocks.<i>.` otherwise."""
    chunks = block_chunks if block_chunks and depth % block_chunks == 0 else 0
    per = depth // chunks if chunks else 0
    out: dict[str, Tensor] = {}
    for k, v in model_sd.items():
        if not k.startswith("teacher."):
            continue
        k = k[len("teacher."):]
        if chunks and k.startswith("backbone.blocks."):
            parts = k.split(".")
            i = int(parts[2])
            k = ".".join(["backbone", "blocks", str(i // per), str(i)] + parts[3:])
        out[k] = v.detach().float().cpu().clone()
    return {"teacher": out}


def export_teacher(out_dir: str | Path, model_sd: dict[str, Tensor], vit_config: Any, block_chunks: int,
                   extra: dict[str, Any]) -> dict[str, Path]:
    out = Path(out_dir)
    vit = teacher_backbone_from_state(model_sd, vit_config)
    ours = out / "teacher_backbone.safetensors"
    save_backbone(vit, ours, extra={"ssl": extra})
    orig = out / "teacher_checkpoint.pth"
    _atomic_torch_save(original_teacher_layout(model_sd, vit_config.depth, block_chunks), orig)
    return {"ours": ours, "original": orig}


def export_teacher_shards(out_dir: str | Path, model_sd: dict[str, Tensor], vit_config: Any, max_mib: float,
                          extra: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """The teacher backbone as `teacher_backbone.<i>-of-<n>.safetensors` files of at most `max_mib` MiB each
    (bf16 by default): small enough to travel where file sizes are capped. Every shard carries the full
    metadata (config, transform, shard index, the sha256 of the whole fp32 state), and
    `load_backbone_shards(folder)` reassembles and checks them."""
    from chexfound.data.transform import InputTransform
    from chexfound.models.format import save_tensors, state_dict_sha256

    vit = teacher_backbone_from_state(model_sd, vit_config)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in vit.state_dict().items()}
    limit = int(max_mib * 2**20) - 64 * 1024  # room for the header
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
    meta = {"kind": "backbone_shard", "config": vit.cfg.to_dict(),
            "transform": InputTransform.for_backbone(vit.cfg).to_dict(), "dtype": str(dtype).replace("torch.", ""),
            "fp32_weights_sha256": state_dict_sha256(vit.state_dict()), "n_shards": len(groups), "ssl": extra}
    out = []
    for i, keys in enumerate(groups):
        path = Path(out_dir) / f"teacher_backbone.{i + 1:02d}-of-{len(groups):02d}.safetensors"
        save_tensors(path, {k: sd[k] for k in keys}, {**meta, "shard": i + 1})
        out.append(path)
    return out


def load_backbone_shards(folder: str | Path, prefix: str = "teacher_backbone.") -> tuple[VisionTransformer, dict]:
    """Reassemble `export_teacher_shards` output -> (fp32 model in eval mode, metadata)."""
    from chexfound.models.config import ViTConfig
    from chexfound.models.format import load_tensors

    files = sorted(Path(folder).glob(f"{prefix}*-of-*.safetensors"))
    if not files:
        raise CheckpointError(folder, "no backbone shards here")
    sd: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for f in files:
        t, meta = load_tensors(f)
        if meta.get("kind") != "backbone_shard":
            raise CheckpointError(f, f"not a backbone shard (kind={meta.get('kind')!r})")
        sd.update(t)
    if len(files) != int(meta["n_shards"]):
        raise CheckpointError(folder, f"{len(files)} shard files, expected {meta['n_shards']}")
    vit = VisionTransformer(ViTConfig.from_dict(meta["config"]))
    missing, unexpected = vit.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise CheckpointError(folder, f"shards do not match the config: missing {missing}, unexpected {unexpected}")
    return vit.eval(), meta


# -- stage initialisation (progressive resolution) --------------------------------------------------
_CHUNKED = re.compile(r"(^|\.)blocks\.(\d+)\.(\d+)\.")


def _unchunk(key: str) -> str:
    return _CHUNKED.sub(lambda m: f"{m.group(1)}blocks.{m.group(3)}.", key)


def resize_pos_embed(pos: Tensor, new_grid: int) -> Tensor:
    """[1, 1 + g*g, D] -> [1, 1 + new_grid^2, D]: the CLS entry kept, the grid resized bicubically (fp32)."""
    n = pos.shape[1] - 1
    g = int(math.isqrt(n))
    if g * g != n:
        raise CheckpointError(None, f"pos_embed with {n} patch positions is not a square grid")
    grid = pos[:, 1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1)
    return torch.cat([pos[:, :1].float(), grid], dim=1).to(pos.dtype)


def _weights_of(path: Path) -> dict[str, dict[str, Tensor]]:
    """{"student": sd, "teacher": sd} from our checkpoint, the original model_checkpoint.pth
    ({"model": {student.*, teacher.*}}) or teacher_checkpoint.pth ({"teacher": ...}, used for both)."""
    obj = load_checkpoint(path)
    if "model" in obj and isinstance(obj["model"], dict):
        sd = obj["model"]
    elif "teacher" in obj and isinstance(obj["teacher"], dict):
        sd = {f"teacher.{k}": v for k, v in obj["teacher"].items()}
    else:
        raise CheckpointError(path, f"unknown checkpoint layout (top-level keys {sorted(obj)[:6]})")
    out: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}}
    for k, v in sd.items():
        k = k.replace("module.", "")
        for side in ("student", "teacher"):
            if k.startswith(side + "."):
                out[side][_unchunk(k[len(side) + 1:])] = v
    if not out["student"]:
        out["student"] = dict(out["teacher"])
    if not out["teacher"]:
        raise CheckpointError(path, "no teacher/student weights found")
    return out


def init_from_checkpoint(student: nn.Module, teacher: nn.Module, path: str | Path, pos_mode: str) -> list[str]:
    """Load backbone (and, where shapes match, head) weights of an earlier stage; returns notes."""
    p = Path(path)
    weights = _weights_of(p)
    notes: list[str] = []
    for side, module in (("student", student), ("teacher", teacher)):
        own = module.state_dict()
        sd = dict(weights[side])
        if "backbone.pos_embed" in sd and sd["backbone.pos_embed"].shape != own["backbone.pos_embed"].shape:
            if pos_mode == "reinit":
                del sd["backbone.pos_embed"]
                notes.append(f"{side}: pos_embed re-initialised (resolution changed)")
            else:
                new_grid = int(math.isqrt(own["backbone.pos_embed"].shape[1] - 1))
                sd["backbone.pos_embed"] = resize_pos_embed(sd["backbone.pos_embed"], new_grid)
                notes.append(f"{side}: pos_embed interpolated to a {new_grid}x{new_grid} grid")
        for k in [k for k in sd if k in own and sd[k].shape != own[k].shape]:
            if k.startswith("backbone."):
                raise CheckpointError(p, f"{side} {k}: shape {tuple(sd[k].shape)} != {tuple(own[k].shape)}")
            notes.append(f"{side}: {k} not loaded (shape {tuple(sd[k].shape)} != {tuple(own[k].shape)})")
            del sd[k]
        missing, unexpected = module.load_state_dict(sd, strict=False)
        bad = [k for k in missing if k.startswith("backbone.") and not (k == "backbone.pos_embed" and pos_mode == "reinit")]
        if bad or [k for k in unexpected if k.startswith("backbone.")]:
            raise CheckpointError(p, f"{side} backbone keys do not match: missing {bad}, unexpected {unexpected}")
        if missing:
            notes.append(f"{side}: freshly initialised {len(missing)} head tensor(s)")
    return notes
