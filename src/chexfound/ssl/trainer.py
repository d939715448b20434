"""One pretraining step, owned by `Trainer`: multi-crop -> masks -> teacher targets -> student -> loss ->
backward -> clipping -> AdamW -> teacher EMA; plus the precision and per-step seeding rules.
The run around it (data, checkpoints, probes, logging) is `chexfound.ssl.train.pretrain`."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import torch

from chexfound.errors import ChexfoundError, ConfigError
from chexfound.models import VisionTransformer
from chexfound.ssl import distributed as D
from chexfound.ssl.augment import MultiCropAugment
from chexfound.ssl.checkpoint import full_model_state, full_optimizer_state, load_full_state, teacher_backbone_from_state
from chexfound.ssl.masking import BlockMaskGenerator, sample_batch_masks
from chexfound.ssl.meta_arch import SSLMetaArch
from chexfound.ssl.param_groups import apply_schedule, build_param_groups
from chexfound.ssl.schedules import Schedules, build_schedules, scaled_lr
from chexfound.ssl.timing import StepTimer

log = logging.getLogger(__name__)


class NonFiniteLossError(ChexfoundError):
    """The loss became NaN/inf; the run stopped before touching the last good checkpoint."""


# -- precision -------------------------------------------------------------------------------------
def resolve_precision(dtype: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed)."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "fp32":
        return None, False
    if device.type == "cuda":
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            log.warning("bf16 is not supported on %s: using fp16 autocast with a gradient scaler", device)
            dtype = "fp16"
        return (torch.bfloat16, False) if dtype == "bf16" else (torch.float16, True)
    if dtype == "fp16":
        raise ConfigError(None, "train.dtype=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return torch.bfloat16, False


def step_seed(seed: int, step: int, rank: int) -> int:
    return ((int(seed) * 1_000_003 + int(step)) * 4_099 + int(rank)) % (2**62)


# -- the trainer -----------------------------------------------------------------------------------
class Trainer:
    """Model, optimizer and one training step; no data loading, logging or files (see `pretrain`)."""

    def __init__(self, cfg: dict[str, Any], info: D.DistInfo, timer: StepTimer | None = None) -> None:
        self.cfg, self.info, self.device = cfg, info, info.device
        self.timer = timer
        torch.manual_seed(int(cfg["train"]["seed"]))  # identical initialisation on every rank
        self.meta = SSLMetaArch(cfg).to(self.device)
        self.vit_config = self.meta.vit_config
        self.amp_dtype, use_scaler = resolve_precision(cfg["train"]["dtype"], self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.sharded = info.enabled and cfg["train"]["distributed"] == "fsdp"
        self.augment = MultiCropAugment.from_config(cfg, self.vit_config.mean, self.vit_config.std)
        grid = cfg["crops"]["global_crops_size"] // self.vit_config.patch_size
        i = cfg["ibot"]
        self.mask_gen = BlockMaskGenerator((grid, grid), min_patches=int(i["mask_min_patches"]),
                                           max_patches=int(i["mask_max_fraction"] * grid * grid))
        self._wrap()
        self.optimizer = self._make_optimizer()
        self.schedules: Schedules | None = None
        from concurrent.futures import ThreadPoolExecutor

        self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="masks")
        self._next_masks: Any = None

    def _wrap(self) -> None:
        meta, cfg = self.meta, self.cfg
        if cfg["train"]["compile"]:
            meta.student.backbone.compile()
            meta.teacher.backbone.compile()
        if not self.info.enabled:
            return
        if self.sharded:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = (MixedPrecisionPolicy(param_dtype=self.amp_dtype, reduce_dtype=torch.float32)
                  if self.amp_dtype is not None else MixedPrecisionPolicy())
            for model in (meta.student, meta.teacher):
                for blk in model.backbone.blocks:
                    fully_shard(blk, mp_policy=mp)
                fully_shard(model, mp_policy=mp)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            meta.set_student_runner(DDP(meta.student, device_ids=ids, broadcast_buffers=False))
            # DDP broadcast rank 0's student; the teacher must start from the same weights.
            with torch.no_grad():
                for t, s in zip(meta.teacher.parameters(), meta.student.parameters()):
                    t.copy_(s)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = build_param_groups(self.meta.student.named_parameters(prefix=""), self.vit_config.depth, self.cfg)
        for g in groups:
            g.pop("names")
        betas = tuple(self.cfg["optim"]["betas"])
        fused_ok = self.device.type == "cuda" and not self.sharded
        return torch.optim.AdamW(groups, betas=betas, lr=0.0, fused=fused_ok or None)

    def reset_optimizer(self) -> None:
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.scaler.is_enabled())
        self.meta.dino_center.center.zero_()
        self.meta.ibot_center.center.zero_()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def global_batch(self) -> int:
        return int(self.cfg["train"]["batch_size_per_gpu"]) * self.info.world_size

    def base_lr(self) -> float:
        o = self.cfg["optim"]
        return scaled_lr(float(o["base_lr"]), self.global_batch, o["scaling_rule"])

    def set_schedules(self, total: int, epoch_length: int) -> None:
        self.schedules = build_schedules(self.cfg, self.base_lr(), total, epoch_length)

    def _section(self, name: str) -> contextlib.AbstractContextManager:
        return self.timer.section(name) if self.timer is not None else contextlib.nullcontext()

    def make_batch(self, step: int, images: torch.Tensor) -> dict[str, torch.Tensor]:
        seed = step_seed(self.cfg["train"]["seed"], step, self.info.rank)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        with self._section("augment"):
            batch = self.augment(images, gen)
        if self.meta.ibot_enabled:
            with self._section("masks"):
                n = batch["global_crops"].shape[0]
                fut = self._next_masks
                masks, idx = (fut[1].result() if fut is not None and fut[0] == (step, n)
                              else self._masks(step, n))
                # Build the next step's masks on a host thread while the device works on this one.
                self._next_masks = ((step + 1, n), self._mask_pool.submit(self._masks, step + 1, n))
                batch["masks"] = masks.to(self.device, non_blocking=True)
                batch["mask_idx"] = idx.to(self.device, non_blocking=True)
                batch["n_masked"] = int(idx.numel())  # type: ignore[assignment]
        torch.manual_seed(seed)  # stochastic depth
        return batch

    def _masks(self, step: int, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block masks of one step (seeded by step and rank) and the flat indices of masked patches."""
        i = self.cfg["ibot"]
        rng = np.random.default_rng([int(self.cfg["train"]["seed"]), step, self.info.rank, 7])
        masks = sample_batch_masks(n_images, self.mask_gen, float(i["mask_sample_probability"]),
                                   tuple(i["mask_ratio_min_max"]), rng)
        return masks, masks.flatten().nonzero().flatten()

    def train_step(self, step: int, images: torch.Tensor, lr_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """One optimisation step on this rank's uint8 images [b, 1, S, S]; returns detached stats."""
        assert self.schedules is not None, "call set_schedules first"
        sc = self.schedules.at(step)
        apply_schedule(self.optimizer, sc["lr"] * lr_scale, sc["wd"], sc["last_layer_lr"] * lr_scale)
        batch = self.make_batch(step, images)
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = self.meta.forward_losses(batch, sc["teacher_temp"], self.autocast, self.timer)
        with self._section("finite_check"):
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
            D.all_reduce_max(bad)
        if bad.item() > 0:
            parts = ", ".join(f"{k}={float(v):.4g}" for k, v in stats.items() if k.endswith("loss"))
            raise NonFiniteLossError(f"the loss became non-finite at iteration {step} ({parts})")
        with self._section("backward"):
            self.scaler.scale(loss).backward()
        with self._section("optimizer"):
            self.scaler.unscale_(self.optimizer)
            norms = {}
            clip = self.cfg["optim"]["clip_grad"]
            for name, mod in self.meta.student_submodules().items():
                params = [p for p in mod.parameters() if p.grad is not None]
                n = torch.nn.utils.clip_grad_norm_(params, float(clip) if clip else float("inf"))
                norms[name] = n.full_tensor() if hasattr(n, "full_tensor") else n
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with self._section("ema"):
            self.meta.update_teacher(sc["momentum"])
        total_norm = torch.sqrt(sum(v.float() ** 2 for v in norms.values()))
        stats["grad_norm"] = total_norm
        for k, v in norms.items():
            stats[f"grad_norm_{k}"] = v
        return stats

    # -- state ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"model": full_model_state(self.meta, self.sharded),
                "optimizer": full_optimizer_state(self.meta, self.optimizer, self.sharded),
                "scaler": self.scaler.state_dict()}

    def load_state(self, payload: dict[str, Any]) -> None:
        load_full_state(self.meta, self.optimizer, payload["model"], payload["optimizer"], self.sharded)
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])

    def teacher_backbone(self) -> VisionTransformer | None:
        """An unsharded teacher backbone for probes/exports (a collective under FSDP; None off rank 0)."""
        if not self.sharded:
            return self.meta.teacher.backbone
        sd = full_model_state(self.meta, True)
        return teacher_backbone_from_state(sd, self.vit_config).to(self.device) if self.info.is_main else None
