"""The pretraining loop: `pretrain(cfg, out_dir)`; the same code runs alone or under torchrun.

One iteration: gather this rank's uint8 images -> multi-crop on the device -> block masks -> teacher targets
-> student forward -> DINO + iBOT + KoLeo loss -> (non-finite? stop) -> backward -> per-module gradient
clipping -> AdamW step (lr / wd / last-layer lr from the schedules) -> teacher EMA.

Everything random in an iteration (which images, crops, masks, stochastic depth) is seeded by
(seed, iteration, rank), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from chexfound.errors import ChexfoundError, ConfigError
from chexfound.models import VisionTransformer
from chexfound.runio import RunLog, read_jsonl
from chexfound.ssl import distributed as D
from chexfound.ssl.checkpoint import (export_teacher, full_model_state, init_from_checkpoint, latest_checkpoint,
                                      load_checkpoint, save_checkpoint)
from chexfound.ssl.config import diff_configs, dump_config
from chexfound.ssl.data import (LoaderSource, PreloadedSource, Skipped, corpus_paths, load_preloaded)
from chexfound.ssl.diagnostics import CollapseMonitor, plot_report
from chexfound.ssl.meta_arch import SSLMetaArch, all_reduce_stats
from chexfound.ssl.sampler import ShardedStreamSampler

from chexfound.ssl.trainer import NonFiniteLossError, Trainer, resolve_precision, step_seed  # noqa: F401

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption (they do not change what is learned).
VOLATILE_KEYS = ("data.num_workers", "train.log_every", "train.cpu_threads", "checkpoint.", "probe.", "resolved.", "_preset",
                 "data.cache", "data.preload_max_gb", "train.compile")


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class RunResult:
    out_dir: Path
    iterations: int
    stopped_early: bool = False
    comparison: dict[str, Any] = field(default_factory=dict)
    exports: dict[str, Path] = field(default_factory=dict)


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

    metrics = RunLog(out / "metrics.jsonl", enabled=info.is_main)
    if ckpt is None:
        metrics.clear()  # a fresh run in a folder without checkpoints
    metrics.truncate_after(start)  # rows past the checkpoint belong to the lost tail of a killed run

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
        from chexfound.runio import atomic_write_bytes

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
                row = {"iteration": done, "epoch": sampler.epoch_of(done), **red, **sc,
                       "images_per_s": ips, "elapsed_s": elapsed_before + now - t_start,
                       "n_skipped": len(skipped.items)}
                metrics.write("train", **row)
                warn = monitor.check(done, red, 2 * b)
                if warn and info.is_main:
                    (bar.write if bar is not None else say)(f"WARNING: {warn}")
                    metrics.write("warning", iteration=done, message=warn)
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
        rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "train"]
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


def _check_replicas(trainer: Trainer, metrics: RunLog) -> None:
    """Under DDP every rank holds a full teacher: they must be bit-identical (logged; an error if not)."""
    if not trainer.info.enabled or trainer.sharded:
        return
    import torch.distributed as dist

    from chexfound.models.format import state_dict_sha256

    sha = state_dict_sha256(trainer.meta.teacher.state_dict())
    shas: list[Any] = [None] * trainer.info.world_size
    dist.all_gather_object(shas, sha)
    metrics.write("ranks", teacher_sha256=shas, agree=len(set(shas)) == 1)
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
