"""Training checkpoints (atomic, keep-last-k, exact resume) and teacher exports.

Layout of a run folder:
  ckpt/ckpt_<iteration>.pt     {"iteration" (next to run), "model", "optimizer", "scaler", "state"} (torch.save,
                                read back with weights_only=True); written to a temp file, fsynced, renamed
  ckpt/ckpt_<iteration>.yaml   the resolved config of that checkpoint
  teacher_backbone.safetensors our format (chexfound.models.save_backbone): config + input transform in meta
  teacher_checkpoint.pth       the original CheXFound layout {"teacher": {backbone.blocks.<chunk>.<i>...,
                                dino_head..., ibot_head...}} so the original tools can read it
  teacher_backbone.md, teacher_checkpoint.md   their model cards (`chexfound.models.card`), with the final
                                probe comparison (probe_comparison.json) once the run has it

Where a run starts from (`train.init_from`: an earlier stage, the release, any backbone) is
`chexfound.ssl.init_source`; what a finished run exports (provenance, shards, cards) is `chexfound.ssl.exports`.
Checkpoint layouts are read by `chexfound.models.loaders.keys.training_state_sides`; teacher shards are
`chexfound.models.shards`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from chexfound.errors import CheckpointError
from chexfound.models import VisionTransformer, save_backbone
from chexfound.models.card import ModelFile, ResultTable, write_card
from chexfound.models.format import META_KEY, read_meta, sha256_file
from chexfound.models.ours import checkpoint_entry, saved_info
from chexfound.models.shards import load_backbone_shards, save_backbone_shards
from chexfound.runio import atomic_output, atomic_write_bytes
from chexfound.ssl.config import dump_config

__all__ = ["CKPT_DIR", "checkpoint_path", "export_teacher", "export_teacher_shards", "full_model_state",
           "full_optimizer_state", "init_from_checkpoint", "latest_checkpoint", "list_checkpoints",
           "load_backbone_shards", "load_checkpoint", "load_full_state", "measure_save_cost",
           "original_teacher_layout", "save_checkpoint", "teacher_backbone_from_state"]

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


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    """Where the checkpoint of `iteration` lives (its config beside it, as .yaml)."""
    return Path(run_dir) / CKPT_DIR / f"ckpt_{iteration:08d}.pt"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ck = list_checkpoints(run_dir)
    return ck[-1][1] if ck else None


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(run_dir: str | Path, iteration: int, payload: dict[str, Any], cfg: dict[str, Any],
                    keep_last: int) -> Path:
    path = checkpoint_path(run_dir, iteration)
    atomic_write_bytes(path.with_suffix(".yaml"), dump_config(cfg).encode())
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


def _nbytes(obj: Any) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def measure_save_cost(trainer: Any, run_dir: str | Path, clock: Any, shards: bool) -> tuple[float, float]:
    """Seconds for (one checkpoint, the end's checkpoint + teacher exports), for time budgets: the state copy
    is timed (a collective under FSDP), the writes are their bytes over a timed, fsynced write of the teacher
    (rank 0; other ranks return zeros)."""
    t0 = clock()
    state = trainer.state()
    t_state = clock() - t0
    if not trainer.info.is_main:
        return 0.0, 0.0
    teacher = {k: v for k, v in state["model"].items() if k.startswith("teacher.")}
    tmp = Path(run_dir) / CKPT_DIR / ".write_cost.tmp"
    t0 = clock()
    _atomic_torch_save(teacher, tmp)
    t_write = clock() - t0
    tmp.unlink(missing_ok=True)
    per_byte = t_write / max(1, _nbytes(teacher))
    ckpt_s = t_state + _nbytes(state) * per_byte
    # the end: the final checkpoint, a second state copy, the safetensors + original-layout exports (+ bf16 shards)
    end_s = ckpt_s + t_state + (2.0 + (0.5 if shards else 0.0)) * _nbytes(teacher) * per_byte
    return ckpt_s, end_s


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
    layout = original_teacher_layout(model_sd, vit_config.depth, block_chunks)
    # Self-describing: our config beside {"teacher": ...} (the original tools read only "teacher").
    layout[META_KEY] = checkpoint_entry(vit, extra={"ssl": extra})
    _atomic_torch_save(layout, orig)
    write_teacher_cards(out, vit, layout[META_KEY])
    return {"ours": ours, "original": orig}


def write_teacher_cards(out_dir: str | Path, vit: VisionTransformer, meta: dict[str, Any],
                        results: Sequence[ResultTable] = ()) -> list[Path]:
    """The model cards of both teacher exports (`teacher_backbone.md`, `teacher_checkpoint.md`); written again
    with the final probe comparison once the run has measured it."""
    out = Path(out_dir)
    return [write_card(ModelFile(out / name, kind, sha256_file(out / name)), saved_info(vit, meta, out / name),
                       results=results)
            for name, kind in (("teacher_backbone.safetensors", "backbone"),
                               ("teacher_checkpoint.pth", "teacher_checkpoint"))]


def export_teacher_shards(out_dir: str | Path, model_sd: dict[str, Tensor], vit_config: Any, max_mib: float,
                          extra: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """The teacher backbone as `teacher_backbone.<i>-of-<n>.safetensors` files of at most `max_mib` MiB each
    (bf16 by default; `chexfound.models.shards`): `create_backbone(out_dir)` or `load_backbone_shards(out_dir)`
    reassembles them."""
    vit = teacher_backbone_from_state(model_sd, vit_config)
    out = save_backbone_shards(vit, out_dir, max_mib, {"ssl": extra}, dtype=dtype)
    meta = read_meta(out[0])
    info = saved_info(vit, {**meta, "weights_sha256": meta["fp32_weights_sha256"]}, Path(out_dir))
    write_card(ModelFile(Path(out_dir), "shards", "", tuple(f"`{p.name}` (SHA-256 `{sha256_file(p)}`)" for p in out)),
               info)
    return out
