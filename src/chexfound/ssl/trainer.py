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
from chexfound.ssl.masking import (BlockMaskGenerator, DeviceBlockMasks, gather_masked, masked_patch_bound,
                                   sample_batch_masks, sample_batch_masks_device)
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
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Trainer:
    """Model, optimizer and one training step; no data loading, logging or files (see `pretrain`).

    A step never waits for the device: masks and crops are drawn on it, shapes are fixed, and a non-finite
    loss or gradient is handled there too: the AdamW update and the teacher EMA of that step are skipped
    (fused AdamW's `found_inf`, a zero EMA weight), so non-finite values never reach the weights. The host
    learns of it from the stats (`nonfinite`: steps skipped since the trainer was built or restored,
    `first_nonfinite_iteration`: the first of them or -1) whenever it reads them: the loop's log steps, where
    the divergence detector rolls the run back (chexfound.ssl.heal).

    `reference=True` runs the step as it was before (BEiT masks on a host thread copied to the device, a host
    sync per step for the finite check that raises at once, AdamW as before (fused on CUDA only), the EMA
    with lists rebuilt each step, the blur on the drawn subset): only for measuring against
    (bench/pretrain.py --reference) and for the tests that the fast step trains the same model.
    """

    def __init__(self, cfg: dict[str, Any], info: D.DistInfo, timer: StepTimer | None = None,
                 reference: bool = False) -> None:
        self.cfg, self.info, self.device = cfg, info, info.device
        self.timer = timer
        self.reference = reference
        torch.manual_seed(int(cfg["train"]["seed"]))  # identical initialisation on every rank
        self.meta = SSLMetaArch(cfg).to(self.device)
        self.vit_config = self.meta.vit_config
        self.amp_dtype, use_scaler = resolve_precision(cfg["train"]["dtype"], self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.sharded = info.enabled and cfg["train"]["distributed"] == "fsdp"
        self.augment = MultiCropAugment.from_config(cfg, self.vit_config.mean, self.vit_config.std)
        if reference:
            self.augment.static_shapes = False
        grid = cfg["crops"]["global_crops_size"] // self.vit_config.patch_size
        i = cfg["ibot"]
        mask_kw = dict(min_patches=int(i["mask_min_patches"]), max_patches=int(i["mask_max_fraction"] * grid * grid))
        self.mask_gen = BlockMaskGenerator((grid, grid), **mask_kw)  # the host reference
        self.device_masks = DeviceBlockMasks((grid, grid), **mask_kw)
        self._gen = torch.Generator(device=self.device)
        self._wrap()
        self.optimizer = self._make_optimizer()
        self.schedules: Schedules | None = None
        self._nonfinite = torch.zeros((), device=self.device)
        self._first_nonfinite = torch.full((), -1.0, device=self.device)
        self._mask_pool: Any = None
        self._next_masks: Any = None

    def _wrap(self) -> None:
        meta, cfg = self.meta, self.cfg
        mode = cfg["train"]["compile"]
        if mode:
            if mode is not True and mode not in COMPILE_MODES:
                raise ConfigError(None, f"train.compile must be false, true or one of {COMPILE_MODES}, got {mode!r}")
            kw = {} if mode is True else {"mode": mode}
            # Compiled modules share one code object (Module._call_impl), so its graphs (block: student global,
            # student local, teacher, probes; heads: student, teacher) count against one recompile limit
            # (8 by default, 7 used by a step): raise it so probe shapes do not push blocks back to eager.
            from torch._dynamo import config as dynamo_config

            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
            # Per block and per head: every block of a model shares one compiled graph per input shape
            # (global, local, teacher), the graphs stay small, and FSDP/DDP wrap around them unchanged.
            for model in (meta.student, meta.teacher):
                for blk in model.backbone.blocks:
                    blk.compile(**kw)
                for head in (model.dino_head, model.ibot_head):
                    if head is not None:
                        head.compile(**kw)
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
            meta.forget_ema_pairs()
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            meta.set_student_runner(DDP(meta.student, device_ids=ids, broadcast_buffers=False))
            # DDP broadcast rank 0's student; the teacher must start from the same weights.
            with torch.no_grad():
                for t, s in zip(meta.teacher.parameters(), meta.student.parameters()):
                    t.copy_(s)

    @property
    def fused_optimizer(self) -> bool:
        """Fused AdamW (one kernel per group, and it can skip a step on the device): everywhere except the
        reference step, which keeps the old choice (fused on CUDA without FSDP only)."""
        if self.reference:
            return self.device.type == "cuda" and not self.sharded
        return self.device.type in ("cuda", "cpu")

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = build_param_groups(self.meta.student.named_parameters(prefix=""), self.vit_config.depth, self.cfg)
        for g in groups:
            g.pop("names")
        betas = tuple(self.cfg["optim"]["betas"])
        return torch.optim.AdamW(groups, betas=betas, lr=0.0, fused=self.fused_optimizer or None)

    def _reset_nonfinite(self) -> None:
        self._nonfinite.zero_()
        self._first_nonfinite.fill_(-1.0)

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

    # -- the batch -----------------------------------------------------------------------------------
    def make_batch(self, step: int, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Crops (and iBOT masks) of one step, drawn on the images' device from (seed, step, rank)."""
        seed = step_seed(self.cfg["train"]["seed"], step, self.info.rank)
        gen = self._gen
        gen.manual_seed(seed)
        with self._section("augment"):
            batch = self.augment(images, gen)
        if self.meta.ibot_enabled:
            with self._section("masks"):
                n = batch["global_crops"].shape[0]
                masks = self._host_masks(step, n) if self.reference else self._device_masks(n, gen)
                batch.update(self._masked_patches(masks))
        torch.manual_seed(seed)  # stochastic depth
        return batch

    def _mask_args(self) -> tuple[float, tuple[float, float]]:
        i = self.cfg["ibot"]
        return float(i["mask_sample_probability"]), tuple(i["mask_ratio_min_max"])

    def _device_masks(self, n_images: int, gen: torch.Generator) -> torch.Tensor:
        p, ratio = self._mask_args()
        return sample_batch_masks_device(n_images, self.device_masks, p, ratio, gen, self.device)

    def _masked_patches(self, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        p, ratio = self._mask_args()
        bound = masked_patch_bound(masks.shape[0], masks.shape[1], p, ratio)
        mp = gather_masked(masks, bound)
        return {"masks": masks, "mask_idx": mp.idx, "mask_weight": mp.weight, "mask_valid": mp.valid,
                "n_masked": mp.count}

    def _host_masks(self, step: int, n: int) -> torch.Tensor:
        """The reference: BEiT's numpy loop on a host thread, one step ahead, copied to the device."""
        if self._mask_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="masks")
        fut = self._next_masks
        masks = fut[1].result() if fut is not None and fut[0] == (step, n) else self._masks_on_host(step, n)
        self._next_masks = ((step + 1, n), self._mask_pool.submit(self._masks_on_host, step + 1, n))
        return masks.to(self.device, non_blocking=True)

    def _masks_on_host(self, step: int, n_images: int) -> torch.Tensor:
        p, ratio = self._mask_args()
        rng = np.random.default_rng([int(self.cfg["train"]["seed"]), step, self.info.rank, 7])
        return sample_batch_masks(n_images, self.mask_gen, p, ratio, rng)

    # -- the step ------------------------------------------------------------------------------------
    def train_step(self, step: int, images: torch.Tensor, lr_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """One optimisation step on this rank's uint8 images [b, 1, S, S]; returns detached stats (device
        tensors: reading them is what waits for the device)."""
        return self.train_on_batch(step, self.make_batch(step, images), lr_scale)

    def train_on_batch(self, step: int, batch: dict[str, torch.Tensor], lr_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The step on a batch from `make_batch` (tests feed two trainers the same batch)."""
        assert self.schedules is not None, "call set_schedules first"
        sc = self.schedules.at(step)
        apply_schedule(self.optimizer, sc["lr"] * lr_scale, sc["wd"], sc["last_layer_lr"] * lr_scale)
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = self.meta.forward_losses(batch, sc["teacher_temp"], self.autocast, self.timer)
        if self.reference:
            self._reference_finite_check(step, loss, stats)
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
            total_norm = torch.sqrt(sum(v.float() ** 2 for v in norms.values()))
            skip = None if self.reference else self._nonfinite_flag(loss, total_norm)
            self._optimizer_step(skip)
        with self._section("ema"):
            if self.reference:
                self.meta.update_teacher_reference(sc["momentum"])
            else:
                self.meta.update_teacher(sc["momentum"], skip=skip)
        if skip is not None:
            first = (self._nonfinite == 0) & (skip > 0)
            self._first_nonfinite.copy_(torch.where(first, float(step), self._first_nonfinite))
            self._nonfinite.add_(skip)
        stats["grad_norm"] = total_norm
        for k, v in norms.items():
            stats[f"grad_norm_{k}"] = v
        stats["nonfinite"] = self._nonfinite.clone()
        stats["first_nonfinite_iteration"] = self._first_nonfinite.clone()
        return stats

    def _nonfinite_flag(self, loss: torch.Tensor, total_norm: torch.Tensor) -> torch.Tensor:
        """0-dim float, 1.0 when this step must not touch the weights (the same on every rank)."""
        bad = ~torch.isfinite(loss.detach())
        if not self.scaler.is_enabled():  # with fp16's scaler, inf gradients are routine (it skips those)
            bad = bad | ~torch.isfinite(total_norm)
        flag = bad.float().reshape(1)
        D.all_reduce_max(flag)  # a collective, not a host sync
        return flag.reshape(())

    def _optimizer_step(self, skip: torch.Tensor | None) -> None:
        opt = self.optimizer
        if self.scaler.is_enabled() or skip is None:
            # fp16: the scaler skips steps with inf/NaN gradients itself (on the device for fused AdamW).
            self.scaler.step(opt)
            self.scaler.update()
        elif self.fused_optimizer:
            opt.found_inf = skip  # type: ignore[attr-defined]  # fused AdamW skips the update on the device
            try:
                opt.step()
            finally:
                del opt.found_inf  # type: ignore[attr-defined]
        elif skip.item() == 0:  # an optimizer that cannot skip on the device: ask the host (a sync)
            opt.step()

    def _reference_finite_check(self, step: int, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        with self._section("finite_check"):
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
            D.all_reduce_max(bad)
        if bad.item() > 0:
            parts = ", ".join(f"{k}={float(v):.4g}" for k, v in stats.items() if k.endswith("loss"))
            raise NonFiniteLossError(f"the loss became non-finite at iteration {step} ({parts})")

    # -- state ---------------------------------------------------------------------------------------
    def check_replicas(self, metrics: Any) -> None:
        """Under DDP every rank holds a full teacher: they must be bit-identical (a `kind: ranks` row; an error
        if not). A collective: every rank calls it."""
        if not self.info.enabled or self.sharded:
            return
        import torch.distributed as dist

        from chexfound.models.format import state_dict_sha256

        shas: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(shas, state_dict_sha256(self.meta.teacher.state_dict()))
        metrics.write_row({"kind": "ranks", "teacher_sha256": shas, "agree": len(set(shas)) == 1})
        if len(set(shas)) != 1:
            raise ChexfoundError(f"the teacher differs between ranks after training ({shas}); "
                                 "this is a bug in the distributed setup")

    def state(self) -> dict[str, Any]:
        return {"model": full_model_state(self.meta, self.sharded),
                "optimizer": full_optimizer_state(self.meta, self.optimizer, self.sharded),
                "scaler": self.scaler.state_dict()}

    def load_state(self, payload: dict[str, Any]) -> None:
        load_full_state(self.meta, self.optimizer, payload["model"], payload["optimizer"], self.sharded)
        self.meta.forget_ema_pairs()
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self._reset_nonfinite()

    def teacher_backbone(self) -> VisionTransformer | None:
        """An unsharded teacher backbone for probes/exports (a collective under FSDP; None off rank 0)."""
        if not self.sharded:
            return self.meta.teacher.backbone
        sd = full_model_state(self.meta, True)
        return teacher_backbone_from_state(sd, self.vit_config).to(self.device) if self.info.is_main else None
