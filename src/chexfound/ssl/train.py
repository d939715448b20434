"""The pretraining loop: `pretrain(cfg, out_dir)`; the same code runs alone or under torchrun.

One iteration: gather this rank's uint8 images -> multi-crop on the device -> block masks -> teacher targets
-> student forward -> DINO + iBOT + KoLeo loss -> (non-finite? stop) -> backward -> per-module gradient
clipping -> AdamW step (lr / wd / last-layer lr from the schedules) -> teacher EMA.

Everything random in an iteration (which images, crops, masks, stochastic depth) is seeded by
(seed, iteration, rank), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from chexfound.errors import ChexfoundError, ConfigError
from chexfound.models import VisionTransformer
from chexfound.ssl import distributed as D
from chexfound.ssl.augment import MultiCropAugment
from chexfound.ssl.checkpoint import (export_teacher, full_model_state, full_optimizer_state, init_from_checkpoint,
                                      latest_checkpoint, load_checkpoint, load_full_state, save_checkpoint,
                                      teacher_backbone_from_state)
from chexfound.ssl.config import diff_configs, dump_config
from chexfound.ssl.data import (LoaderSource, PreloadedSource, Skipped, corpus_paths, load_preloaded)
from chexfound.ssl.diagnostics import CollapseMonitor, plot_report, read_metrics
from chexfound.ssl.masking import BlockMaskGenerator, sample_batch_masks
from chexfound.ssl.meta_arch import SSLMetaArch, all_reduce_stats
from chexfound.ssl.param_groups import apply_schedule, build_param_groups
from chexfound.ssl.sampler import ShardedStreamSampler
from chexfound.ssl.schedules import Schedules, build_schedules, scaled_lr
from chexfound.ssl.timing import StepTimer

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption (they do not change what is learned).
VOLATILE_KEYS = ("data.num_workers", "train.log_every", "train.cpu_threads", "checkpoint.", "probe.", "resolved.", "_preset",
                 "data.cache", "data.preload_max_gb", "train.compile")


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


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class RunResult:
    out_dir: Path
    iterations: int
    stopped_early: bool = False
    comparison: dict[str, Any] = field(default_factory=dict)
    exports: dict[str, Path] = field(default_factory=dict)


class MetricsLog:
    """metrics.jsonl (rank 0): one JSON object per line; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, iteration: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        from chexfound.models.format import atomic_write_bytes

        # Rows up to the checkpoint were written before it was saved; later ones belong to the lost tail.
        keep = [r for r in read_metrics(self.path) if r.get("iteration", 0) <= iteration]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    def strip(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if any(key == v_.rstrip(".") or (v_.endswith(".") and key.startswith(v_)) for v_ in VOLATILE_KEYS):
                continue
            out[k] = strip(v, key + ".") if isinstance(v, dict) else v
        return out

    return strip(cfg)


def _probe_iterations(total: int, n_evals: int) -> set[int]:
    if n_evals <= 0:
        return set()
    return {int(round(total * (k + 1) / (n_evals + 1))) for k in range(n_evals)} - {0, total}


def pretrain(
    cfg: dict[str, Any],
    out_dir: str | Path,
    device: str | None = None,
    quiet: bool = False,
    stop_after: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> RunResult:
    """Run (or resume) a pretraining run in `out_dir`. `stop_after`: stop (as if killed, after a checkpoint)
    once this many iterations are done — used to test resumption."""
    t_start = time.perf_counter()
    info = D.init_distributed(device)
    if info.device.type == "cpu" and cfg["train"].get("cpu_threads"):
        torch.set_num_threads(int(cfg["train"]["cpu_threads"]))
    out = Path(out_dir)
    say = echo or (lambda s: print(s, flush=True))
    if not info.is_main:
        say = lambda s: log.debug(s)  # noqa: E731
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    D.barrier()

    # -- the recipe of this folder ----------------------------------------------------------------
    cfg = dict(cfg)
    cfg.pop("resolved", None)
    saved_cfg_path = out / "config.yaml"
    ckpt = latest_checkpoint(out)
    if ckpt is not None and saved_cfg_path.is_file():
        import yaml

        saved = yaml.safe_load(saved_cfg_path.read_text()) or {}
        diff = diff_configs(_comparable(saved), _comparable(cfg))
        if diff:
            raise ConfigError(saved_cfg_path, f"{out} holds a run with a different recipe (keys {diff}); "
                              "resume with the same options or use another --out")

    # -- data -------------------------------------------------------------------------------------
    d = cfg["data"]
    paths = corpus_paths(d["sources"], d["split"])
    size = int(cfg["crops"]["global_crops_size"])
    b = int(cfg["train"]["batch_size_per_gpu"])
    pipeline = d["pipeline"]
    if pipeline == "auto":
        pipeline = "preload" if len(paths) * size * size / 1e9 <= float(d["preload_max_gb"]) else "loader"
    skipped = Skipped()
    sampler: ShardedStreamSampler
    if pipeline == "preload":
        cache = out / "cache" if d["cache"] else None
        if info.is_main:
            images = load_preloaded(paths, size, int(d["num_workers"]), cache, skipped, progress=not quiet)
        D.barrier()
        if not info.is_main:
            images = load_preloaded(paths, size, int(d["num_workers"]), cache, skipped)
        n_items = images.shape[0]
        if n_items == 0:
            raise ConfigError(None, f"none of the {len(paths)} images could be read (see {out / 'skipped.txt'})")
        sampler = ShardedStreamSampler(n_items, b, info.world_size, info.rank, int(cfg["train"]["seed"]))
        source: Any = PreloadedSource(images, sampler, info.device)
        del images
    else:
        n_items = len(paths)
        sampler = ShardedStreamSampler(n_items, b, info.world_size, info.rank, int(cfg["train"]["seed"]))
        source = LoaderSource(paths, size, sampler, info.device, int(d["num_workers"]), skipped)
    if info.is_main and skipped.items:
        skipped.write(out / "skipped.txt")
        say(f"skipped {len(skipped.items)} unreadable image(s); listed in {out / 'skipped.txt'}")

    # -- model ------------------------------------------------------------------------------------
    trainer = Trainer(cfg, info)
    meta = trainer.meta
    n_params = sum(p.numel() for p in meta.student.backbone.parameters())
    say(f"pretrain: {n_items} images ({pipeline} pipeline), {info.world_size} process(es) on {info.device}, "
        f"backbone {cfg['student']['arch']} {n_params / 1e6:.1f}M params, global batch {trainer.global_batch}, "
        f"lr {trainer.base_lr():.3g}, precision {trainer.amp_dtype or torch.float32}")
    monitor_state: dict[str, Any] = {}
    start = 0
    elapsed_before = 0.0
    total: int | None = None
    epoch_length = int(cfg["train"]["epoch_length"])
    if ckpt is not None:
        payload = load_checkpoint(ckpt)
        trainer.load_state(payload)
        st = payload.get("state", {})
        start = int(payload["iteration"])
        total, epoch_length = int(st["total_iterations"]), int(st["epoch_length"])
        monitor_state = st.get("monitor", {})
        elapsed_before = float(st.get("elapsed_s", 0.0))
        say(f"resuming from {ckpt} at iteration {start} of {total}")
        del payload
    elif cfg["train"]["init_from"]:
        from chexfound.ssl.config import expand_path

        notes = init_from_checkpoint(meta.student, meta.teacher, expand_path(cfg["train"]["init_from"]),
                                     cfg["train"]["pos_embed_on_resize"])
        for n in notes:
            say(f"init_from: {n}")

    metrics = MetricsLog(out / "metrics.jsonl", info.is_main)
    if ckpt is None and info.is_main and metrics.path.exists():
        metrics.path.unlink()  # a fresh run in a folder without checkpoints
    metrics.truncate_after(start)

    # -- probe task (rank 0) ------------------------------------------------------------------------
    from chexfound.ssl.probe_runner import ProbeRunner

    prober = ProbeRunner(cfg, trainer, out, say, info.is_main)
    if start == 0 and ckpt is None:
        prober.periodic(0, metrics)

    # -- how long -----------------------------------------------------------------------------------
    if total is None:
        budget = cfg["train"]["time_budget_s"]
        if budget:
            total, epoch_length = _fit_to_budget(trainer, source, cfg, float(budget), t_start, prober, say)
        else:
            total = int(round(float(cfg["optim"]["epochs"]) * epoch_length))
    trainer.set_schedules(total, epoch_length)
    resolved = {"world_size": info.world_size, "global_batch": trainer.global_batch, "lr": trainer.base_lr(),
                "total_iterations": total, "epoch_length": epoch_length, "n_images": n_items,
                "pipeline": pipeline, "n_skipped": len(skipped.items)}
    if info.is_main:
        from chexfound.models.format import atomic_write_bytes

        atomic_write_bytes(saved_cfg_path, dump_config({**cfg, "resolved": resolved}).encode())
    probe_at = _probe_iterations(total, int(cfg["probe"]["n_evals"]))
    monitor = CollapseMonitor(total)
    monitor.load_state_dict(monitor_state)

    last_plot = [0.0]

    def save(it: int) -> Path | None:
        state = trainer.state()  # collective under FSDP
        path = None
        if info.is_main:
            extra = {"total_iterations": total, "epoch_length": epoch_length, "monitor": monitor.state_dict(),
                     "elapsed_s": elapsed_before + time.perf_counter() - t_start}
            path = save_checkpoint(out, it, {**state, "state": extra}, {**cfg, "resolved": resolved},
                                   int(cfg["checkpoint"]["keep_last"]))
            if skipped.items:
                skipped.write(out / "skipped.txt")
            if time.perf_counter() - last_plot[0] > 120:  # the report is refreshed at most every 2 min
                plot_report(out / "metrics.jsonl", out / "report.png", title=str(out))
                last_plot[0] = time.perf_counter()
        D.barrier()
        return path

    # -- loop ---------------------------------------------------------------------------------------
    log_every = max(1, int(cfg["train"]["log_every"]))
    ckpt_every = int(cfg["checkpoint"]["every"])
    bar = None
    if info.is_main and not quiet and start < total:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="pretrain", unit="it", dynamic_ncols=True)
    last_t = time.perf_counter()
    images_since = 0
    last_good: Path | None = latest_checkpoint(out)
    stopped_early = False
    it = start
    if start < total:
        for it, images, _n_bad in source.batches(start):
            if it >= total:
                break
            try:
                stats = trainer.train_step(it, images)
            except NonFiniteLossError as e:
                if bar is not None:
                    bar.close()
                where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
                raise NonFiniteLossError(f"{e}; stopped, {where}. Lower optim.base_lr, raise "
                                         "optim.warmup_epochs or use train.dtype=fp32.") from None
            images_since += images.shape[0] * info.world_size
            done = it + 1
            if done % log_every == 0 or done == total or done == 1:
                now = time.perf_counter()
                red = all_reduce_stats(stats, info.device)
                ips = images_since / max(now - last_t, 1e-9)
                last_t, images_since = now, 0
                sc = trainer.schedules.at(it)  # type: ignore[union-attr]
                row = {"kind": "train", "iteration": done, "epoch": sampler.epoch_of(done), **red, **sc,
                       "images_per_s": ips, "elapsed_s": elapsed_before + now - t_start,
                       "n_skipped": len(skipped.items)}
                metrics.write(row)
                warn = monitor.check(done, red, 2 * b)
                if warn and info.is_main:
                    (bar.write if bar is not None else say)(f"WARNING: {warn}")
                    metrics.write({"kind": "warning", "iteration": done, "message": warn})
                if bar is not None:
                    bar.set_postfix(loss=f"{red['loss']:.3f}", img_s=f"{ips:.1f}",
                                    protos=int(red["prototypes_in_use"]))
            if bar is not None:
                bar.update(1)
            if done in probe_at:
                prober.periodic(done, metrics)
                last_t, images_since = time.perf_counter(), 0
            if ckpt_every and done % ckpt_every == 0 and done < total:
                last_good = save(done) or last_good
                last_t, images_since = time.perf_counter(), 0
            if stop_after is not None and done >= stop_after and done < total:
                last_good = save(done) or last_good
                stopped_early = True
                break
        if bar is not None:
            bar.close()
    if stopped_early:
        return RunResult(out, it + 1, stopped_early=True)

    # -- the end ------------------------------------------------------------------------------------
    final_ckpt = latest_checkpoint(out)
    if final_ckpt is None or final_ckpt.name != f"ckpt_{total:08d}.pt":
        save(total)
    result = RunResult(out, total)
    full_sd = full_model_state(meta, trainer.sharded)
    if info.is_main:
        extra = {"preset": cfg.get("_preset"), "iterations": total, "images_seen": total * trainer.global_batch,
                 "n_images": n_items, "data": [str(s.get("path") if isinstance(s, dict) else s)
                                                for s in cfg["data"]["sources"]]}
        result.exports = export_teacher(out, full_sd, trainer.vit_config, int(cfg["checkpoint"]["export_block_chunks"]),
                                        extra)
        say(f"teacher exported: {result.exports['ours']} (ours), {result.exports['original']} (original layout)")
        shard_mib = cfg["checkpoint"].get("export_bf16_shard_mib")
        if shard_mib:
            from chexfound.ssl.checkpoint import export_teacher_shards

            shards = export_teacher_shards(out / "teacher_bf16", full_sd, trainer.vit_config, float(shard_mib), extra)
            say(f"teacher as {len(shards)} bf16 shard(s) of <= {shard_mib} MiB in {out / 'teacher_bf16'}")
        rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"]
        if len(rows) >= 4:
            k = max(1, len(rows) // 10)
            first = float(np.mean([r["loss"] for r in rows[:k]]))
            last = float(np.mean([r["loss"] for r in rows[-k:]]))
            say(f"loss: {first:.4f} (first {k} log rows) -> {last:.4f} (last {k}); "
                f"{'fell' if last < first else 'did NOT fall'}")
    _check_replicas(trainer, metrics)
    result.comparison = prober.final(full_sd, metrics, init_backbone=lambda: _initial_teacher(cfg))
    if info.is_main:
        png = plot_report(out / "metrics.jsonl", out / "report.png", title=f"{cfg.get('_preset')}: {out}")
        if png:
            say(f"run report: {png}")
        budget = cfg["train"]["time_budget_s"]
        took = time.perf_counter() - t_start
        say(f"done in {took:.0f}s" + (f" (budget {float(budget):.0f}s)" if budget else "") + f"; run folder {out}")
    D.barrier()
    return result


def _initial_teacher(cfg: dict[str, Any]) -> VisionTransformer:
    """The teacher backbone as it was at iteration 0 (same seed, same init_from): the fairest baseline."""
    torch.manual_seed(int(cfg["train"]["seed"]))
    meta = SSLMetaArch(cfg)
    if cfg["train"]["init_from"]:
        from chexfound.ssl.config import expand_path

        init_from_checkpoint(meta.student, meta.teacher, expand_path(cfg["train"]["init_from"]),
                             cfg["train"]["pos_embed_on_resize"])
    return meta.teacher.backbone.eval()


def _check_replicas(trainer: Trainer, metrics: MetricsLog) -> None:
    """Under DDP every rank holds a full teacher: they must be bit-identical (logged; an error if not)."""
    if not trainer.info.enabled or trainer.sharded:
        return
    import torch.distributed as dist

    from chexfound.models.format import state_dict_sha256

    sha = state_dict_sha256(trainer.meta.teacher.state_dict())
    shas: list[Any] = [None] * trainer.info.world_size
    dist.all_gather_object(shas, sha)
    metrics.write({"kind": "ranks", "teacher_sha256": shas, "agree": len(set(shas)) == 1})
    if len(set(shas)) != 1:
        raise ChexfoundError(f"the teacher differs between ranks after training ({shas}); "
                             "this is a bug in the distributed setup")


def _fit_to_budget(trainer: Trainer, source: Any, cfg: dict[str, Any], budget: float, t_start: float,
                   prober: Any, say: Callable[[str], None]) -> tuple[int, int]:
    """Total iterations that fit the wall-clock budget: time a few steps with lr = 0 (the student does not
    move, so the EMA teacher stays equal to it), reset the optimizer, and leave room for probes and exports."""
    trainer.set_schedules(10**9, 10**9)
    n_warm, n_timed = 2, 5
    gen = source.batches(0)
    times = []
    for k in range(n_warm + n_timed):
        _, images, _ = next(gen)
        t0 = time.perf_counter()
        trainer.train_step(k, images, lr_scale=0.0)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        if k >= n_warm:
            times.append(time.perf_counter() - t0)
    trainer.reset_optimizer()
    step_t = torch.tensor([float(np.median(times))], device=trainer.device)
    D.all_reduce_max(step_t)
    step_s = float(step_t.item())
    reserve = prober.reserve_s() + 0.02 * budget
    remaining = budget - (time.perf_counter() - t_start) - reserve
    total = max(1, int(remaining / step_s))
    epoch_length = max(1, int(round(total / float(cfg["optim"]["epochs"]))))
    total = int(round(float(cfg["optim"]["epochs"]) * epoch_length)) if total >= float(cfg["optim"]["epochs"]) else total
    say(f"time budget {budget:.0f}s: {step_s * 1000:.0f} ms/iteration, {reserve:.0f}s kept for probes and "
        f"exports -> {total} iterations (epoch = {epoch_length} iterations)")
    return total, epoch_length
