"""The pretraining driver: `pretrain(cfg, out_dir)`; the same code runs alone or under torchrun.

A run goes through six stages, each a function here or a module of its own:
  open    the run folder, the process group, the printed log, the recipe check against a folder to resume
  data    the corpus and its pipeline (chexfound.ssl.data.open_corpus)
  model   the trainer: from scratch, from `train.init_from`, or resumed from the folder's last checkpoint
  length  how many iterations and which probes: kept by a resumed run, fixed by the config, or fitted to the
          time budget by the loop's first iterations (chexfound.ssl.budget: measured costs, the first
          iterations timed at learning rate 0, probes turned down to fit)
  loop    step -> log -> heal? -> probe? -> checkpoint? -> budget? (chexfound.ssl.train_loop), the questions
          answered by the health and budget policies (chexfound.ssl.heal, chexfound.ssl.budget)
  end     final checkpoint, teacher exports, final probes, report (chexfound.ssl.train_end)

One iteration (chexfound.ssl.trainer): gather this rank's uint8 images -> multi-crop on the device -> block
masks -> teacher targets -> student forward -> DINO + iBOT + KoLeo loss -> backward -> per-module gradient
clipping -> AdamW step (lr / wd / last-layer lr from the schedules) -> teacher EMA; a non-finite step skips its
update on the device and the loop learns of it at the next log step. Everything random in an
iteration (which images, crops, masks, stochastic depth) is seeded by (seed, iteration, rank), so a resumed
run repeats the uninterrupted one exactly. A diverging run rolls back and goes on (chexfound.ssl.heal).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from chexfound.runio import check_run_config
from chexfound.ssl import distributed as D
from chexfound.ssl.budget import BudgetPolicy, Clock
from chexfound.ssl.probe_plan import probe_iterations
from chexfound.ssl.checkpoint import latest_checkpoint, load_checkpoint
from chexfound.ssl.data import Corpus, open_corpus
from chexfound.ssl.init_source import check_source_exists, init_from_checkpoint
from chexfound.ssl.run_context import MetricsLog, PrintedLog, RunContext, RunSettings
from chexfound.ssl.run_state import RunState
from chexfound.ssl.train_end import RunResult, finish
from chexfound.ssl.train_loop import TrainLoop
from chexfound.ssl.trainer import NonFiniteLossError, Trainer

log = logging.getLogger(__name__)

__all__ = ["pretrain", "RunResult", "NonFiniteLossError", "Trainer", "VOLATILE_KEYS", "probe_iterations"]

# Keys that may change between a run and its resumption (they do not change what is learned).
VOLATILE_KEYS = ("data.num_workers", "train.log_every", "train.cpu_threads", "checkpoint.", "probe.", "resolved.", "_preset",
                 "data.cache", "data.preload_max_gb", "train.compile", "budget.", "heal.")


def pretrain(
    cfg: dict[str, Any],
    out_dir: str | Path,
    device: str | None = None,
    quiet: bool = False,
    stop_after: int | None = None,
    echo: Callable[[str], None] | None = None,
    clock: Clock = time.perf_counter,
) -> RunResult:
    """Run (or resume) a pretraining run in `out_dir`. `stop_after`: stop (as if killed, after a checkpoint)
    once this many iterations are done (used to test resumption). `clock`: the time source of the budget."""
    ctx, ckpt = _open(cfg, out_dir, device, quiet, echo, clock)
    if ckpt is None and ctx.settings.init_from:
        check_source_exists(ctx.settings.init_from)  # before the corpus is read
    corpus = open_corpus(ctx.cfg, ctx.out, ctx.info, ctx.say, quiet)
    trainer, start, resumed = _model(ctx, corpus, ckpt)
    from chexfound.ssl.probe_runner import ProbeRunner

    prober = ProbeRunner(ctx.cfg, trainer, ctx.out, ctx.say, ctx.info.is_main, clock=clock)
    loop = TrainLoop(ctx, trainer, corpus, prober, *_length(ctx, prober, resumed))
    outcome = loop.run(start, stop_after)
    if outcome.stopped_early:
        return RunResult(ctx.out, outcome.done, stopped_early=True)
    return finish(ctx, loop, prober, outcome, corpus.n_items)


# -- open --------------------------------------------------------------------------------------------------
def _open(cfg: dict[str, Any], out_dir: str | Path, device: str | None, quiet: bool,
          echo: Callable[[str], None] | None, clock: Clock) -> tuple[RunContext, Path | None]:
    t_start = clock()
    info = D.init_distributed(device)
    settings = RunSettings.from_config(cfg)
    if info.device.type == "cpu" and settings.cpu_threads:
        torch.set_num_threads(int(settings.cpu_threads))
    out = Path(out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    D.barrier()
    say: Callable[[str], None] = PrintedLog(out / "pretrain.log", echo) if info.is_main else log.debug
    cfg = dict(cfg)
    cfg.pop("resolved", None)
    ckpt = latest_checkpoint(out)
    if ckpt is not None:  # resuming: the recipe must be the one the folder was started with
        check_run_config(out / "config.yaml", cfg, ignore=VOLATILE_KEYS, what="run")
    metrics = MetricsLog(out / "metrics.jsonl", enabled=info.is_main)
    if ckpt is None:
        metrics.clear()  # a fresh run in a folder without checkpoints
    return RunContext(cfg, settings, out, info, say, metrics, clock, t_start, quiet), ckpt


# -- model -------------------------------------------------------------------------------------------------
def _model(ctx: RunContext, corpus: Corpus, ckpt: Path | None) -> tuple[Trainer, int, RunState | None]:
    """The trainer, and where it starts: (trainer, first iteration, the checkpoint's run state or None)."""
    trainer = Trainer(ctx.cfg, ctx.info)
    s = ctx.settings
    n_params = sum(p.numel() for p in trainer.meta.student.backbone.parameters())
    ctx.say(f"pretrain: {corpus.n_items} images ({corpus.pipeline} pipeline), {ctx.info.world_size} process(es) on "
            f"{ctx.info.device}, backbone {trainer.vit_config.name} {n_params / 1e6:.1f}M params, global batch "
            f"{trainer.global_batch}, lr {trainer.base_lr():.3g}, precision {trainer.amp_dtype or torch.float32}")
    start, resumed = 0, None
    if ckpt is not None:
        payload = load_checkpoint(ckpt)
        trainer.load_state(payload)
        resumed = RunState.from_dict(payload.get("state", {}))
        start = int(payload["iteration"])
        ctx.elapsed_before = resumed.elapsed_s
        ctx.say(f"resuming from {ckpt} at iteration {start} of {resumed.total_iterations}")
        del payload
    elif s.init_from:
        for n in init_from_checkpoint(trainer.meta.student, trainer.meta.teacher, s.init_from, s.pos_embed_on_resize):
            ctx.say(f"init_from: {n}")
        trainer.meta.forget_ema_pairs()
    ctx.metrics.truncate_after(start)
    return trainer, start, resumed


# -- length ------------------------------------------------------------------------------------------------
def _length(ctx: RunContext, prober: Any, resumed: RunState | None) -> tuple[RunState, BudgetPolicy]:
    """How long the run trains and which probes it runs: a resumed run keeps its length, plan and deadline; a
    new one takes them from the config, which a time budget replaces after its calibration (in the loop)."""
    if resumed is not None:
        if resumed.budget is not None:
            prober.costs = resumed.budget.costs
        return resumed, BudgetPolicy(ctx, resumed.plan or prober.configured_plan(), resumed.budget, prober.probe_s)
    s = ctx.settings
    return (RunState(int(round(s.epochs * s.epoch_length)), s.epoch_length),
            BudgetPolicy(ctx, prober.configured_plan(), None, prober.probe_s))
