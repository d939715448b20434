"""The loop of a pretraining run, in DINOv2's shape: each iteration is step -> log -> heal? -> probe? ->
checkpoint? -> budget?, each question put to the object that owns the answer: `HealPolicy` (chexfound.ssl.heal:
divergence, collapse warnings, snapshots, rollbacks, give-up) and `BudgetPolicy` (chexfound.ssl.budget: the
calibration, the probe plan, the pace and its re-plans, the deadline). The loop itself decides nothing about
either. A new run with a time budget starts with the budget's calibration: its first iterations, at learning
rate 0, timed until the budget can fit the run's length; training proper starts after them (`_begin`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from chexfound.runio import write_run_config
from chexfound.ssl import distributed as D
from chexfound.ssl.budget import BudgetPolicy
from chexfound.ssl.checkpoint import save_checkpoint
from chexfound.ssl.data import Corpus
from chexfound.ssl.diagnostics import plot_report
from chexfound.ssl.heal import Divergence, HealPolicy
from chexfound.ssl.meta_arch import all_reduce_stats
from chexfound.ssl.run_context import RunContext
from chexfound.ssl.run_state import RunState
from chexfound.ssl.timing import synchronize
from chexfound.ssl.trainer import NonFiniteLossError, Trainer


@dataclass
class LoopOutcome:
    done: int  # iterations completed
    stopped_early: bool = False  # `stop_after`
    cut_short: str | None = None  # the budget's deadline ended training before `total`
    train_s: float = 0.0  # seconds of training steps (probes and checkpoints left out)


class TrainLoop:
    def __init__(self, ctx: RunContext, trainer: Trainer, corpus: Corpus, prober: Any, state: RunState,
                 budget: BudgetPolicy) -> None:
        self.ctx, self.trainer, self.corpus, self.prober, self.state = ctx, trainer, corpus, prober, state
        self.budget = budget
        self.heal = HealPolicy(ctx.settings.heal, ctx, trainer, 2 * ctx.settings.batch_size, self.apply_schedules)
        self.heal.load_state_dict(state.heal)
        self.last_plot = -math.inf
        self.plot_s = 0.0  # how long the report took to draw (the end keeps that much time for it)
        self.bar: Any = None
        self.last_t, self.images_since = 0.0, 0  # images/s since the last log row

    @property
    def total(self) -> int:
        return self.state.total_iterations

    def apply_schedules(self) -> None:
        self.trainer.set_schedules(self.total, self.state.epoch_length)  # type: ignore[arg-type]
        self.trainer.schedules = self.heal.adjust(self.trainer.schedules, self.total)  # type: ignore[arg-type]

    # -- log ---------------------------------------------------------------------------------------------
    def log(self, done: int, stats: dict[str, torch.Tensor], ips: float | None = None, lr_zero: bool = False
            ) -> dict[str, float]:
        """One `kind: train` row from the step's stats (all-reduced: every rank calls it)."""
        red = all_reduce_stats(stats, self.ctx.info.device)
        if ips is None:
            now = self.ctx.clock()
            ips, self.last_t, self.images_since = self.images_since / max(now - self.last_t, 1e-9), now, 0
        sc = self.trainer.schedules.at(done - 1)  # type: ignore[union-attr]
        if lr_zero:  # the budget's calibration iterations run at learning rate 0
            sc = {**sc, "lr": 0.0, "last_layer_lr": 0.0}
        self.ctx.metrics.write_row({"kind": "train", "iteration": done, "epoch": self.corpus.sampler.epoch_of(done),
                                    **red, **sc, "images_per_s": ips, "elapsed_s": self.ctx.elapsed(),
                                    "n_skipped": len(self.corpus.skipped.items)})
        if self.bar is not None and all(math.isfinite(v) for v in red.values()):
            self.bar.set_postfix(loss=f"{red['loss']:.3f}", img_s=f"{ips:.1f}", protos=int(red["prototypes_in_use"]))
        return red

    # -- calibration, then training proper ----------------------------------------------------------------
    def _calibrate(self, gen: Iterator[Any]) -> int:
        """The budget's calibration: it measures what probes and checkpoints cost, then times the run's first
        iterations, run at learning rate 0 (the warm-up starts from 0 anyway: they cost the run no training),
        until it can fit the run's length and probes. Returns the iterations run."""
        self.budget.measure(self.trainer, self.corpus, self.prober)
        self.trainer.set_schedules(10**9, 10**9)  # the length is not known yet (the lr is 0 whatever it is)
        it, fit = 0, None
        while fit is None:
            images = next(gen)[1]
            t0 = self.ctx.clock()
            stats = self.trainer.train_step(it, images, lr_scale=0.0)
            synchronize(self.trainer.device)
            seconds, it = self.ctx.clock() - t0, it + 1
            if it % self.ctx.settings.log_every == 0 or it == 1:  # rows only: no health reading at lr 0
                self.log(it, stats, images.shape[0] * self.ctx.info.world_size / max(seconds, 1e-9), lr_zero=True)
            fit = self.budget.timed(it, seconds, self.trainer.device)
        self.state.total_iterations, self.state.epoch_length = fit.total, fit.epoch_length
        self.state.budget = self.budget.state
        return it

    def _begin(self, it: int, fresh: bool) -> None:
        """Training proper starts at `it`: the resolved length into config.yaml, the schedules over it, and a
        fresh run's iteration-0 probe (the teacher as initialised: the calibration ran at learning rate 0)."""
        ctx, trainer, corpus = self.ctx, self.trainer, self.corpus
        ctx.cfg["resolved"] = {  # (checkpoints carry it too)
            "world_size": ctx.info.world_size, "global_batch": trainer.global_batch, "lr": trainer.base_lr(),
            "total_iterations": self.total, "epoch_length": self.state.epoch_length, "n_images": corpus.n_items,
            "pipeline": corpus.pipeline, "n_skipped": len(corpus.skipped.items)}
        if ctx.info.is_main:
            write_run_config(ctx.out / "config.yaml", ctx.cfg)
        self.apply_schedules()
        if self.bar is not None:
            self.bar.n, self.bar.total = it, self.total
            self.bar.refresh()
        if fresh and self.budget.plan.periodic >= 1:
            self.prober.periodic(0, ctx.metrics)

    # -- checkpoint ----------------------------------------------------------------------------------------
    def save(self, done: int, total: int | None = None) -> Path | None:
        ctx = self.ctx
        self.state.elapsed_s, self.state.heal = ctx.elapsed(), self.heal.state_dict()
        self.state.budget = self.budget.state
        payload = self.trainer.state()  # collective under FSDP
        path = None
        if ctx.info.is_main:
            st = self.state.to_dict() | ({"total_iterations": total} if total is not None else {})
            path = save_checkpoint(ctx.out, done, {**payload, "state": st}, ctx.cfg, ctx.settings.keep_last)
            if self.corpus.skipped.items:
                self.corpus.skipped.write(ctx.out)  # skipped.csv (chexfound.runio)
            if ctx.clock() - self.last_plot > 120:  # the report is refreshed at most every 2 min
                t0 = ctx.clock()
                plot_report(ctx.out / "metrics.jsonl", ctx.out / "report.png", title=str(ctx.out))
                self.last_plot = ctx.clock()
                self.plot_s = self.last_plot - t0
        D.barrier()
        self.heal.saved(path)
        return path

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self, start: int, stop_after: int | None = None) -> LoopOutcome:
        with self.ctx.progress_bar(self.total, start) as self.bar:
            try:
                return self._run(start, stop_after)
            finally:
                self.bar = None

    def _step(self, it: int, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], Divergence | None]:
        self.images_since += images.shape[0] * self.ctx.info.world_size
        try:
            return self.trainer.train_step(it, images), None
        except NonFiniteLossError as e:  # a trainer that checks every step raises at once
            return {}, Divergence("nonfinite", it + 1, it, str(e))

    def _go_to(self, it: int, new_total: int | None = None) -> None:
        """After a rollback (the rerun starts at `it`) or a re-plan (a new total): the bar and the counters."""
        if new_total is not None:
            self.state.total_iterations = new_total
            self.apply_schedules()
        else:
            self.budget.restart(it)
            self.last_t, self.images_since = self.ctx.clock(), 0
        if self.bar is not None:
            self.bar.n, self.bar.total = it, self.total
            self.bar.refresh()

    def _probe_and_save(self, done: int, total: int, stopping: bool) -> None:
        """probe? -> checkpoint?: pauses in training (its time and images/s leave them out)."""
        self.budget.pause()
        paused = done in self.budget.probe_at
        if self.budget.probe_now(done, total):
            self.prober.periodic(done, self.ctx.metrics)
        every = self.ctx.settings.ckpt_every
        if done < total and (stopping or (every and done % every == 0)):
            paused = True
            self.save(done)
        self.budget.resume()
        if paused:
            self.last_t, self.images_since = self.ctx.clock(), 0

    def _run(self, it: int, stop_after: int | None) -> LoopOutcome:
        fresh, gen = it == 0, self.corpus.source.batches(it)
        if fresh and self.budget.calibrating:  # (a resumed run keeps the length its calibration fitted)
            it = self._calibrate(gen)
        self._begin(it, fresh)
        out = LoopOutcome(done=it, train_s=self.budget.calibration_s)
        if it >= self.total:
            gen.close()
            return out
        self.heal.snapshot(it)
        self.budget.start(it, self.total)
        self.last_t = self.ctx.clock()
        while it < self.total and not (out.stopped_early or out.cut_short):
            stats, div = self._step(it, next(gen)[1])
            done, total = it + 1, self.total
            log_now = done % self.ctx.settings.log_every == 0 or done in (1, total)
            red = self.log(done, stats) if div is None and log_now else None
            target = self.heal.check(done, red, div)
            if target is not None:
                gen.close()
                gen, it = self.corpus.source.batches(target), target
                self._go_to(target)
                continue
            it = done
            if self.bar is not None:
                self.bar.update(1)
            out.stopped_early = stop_after is not None and stop_after <= done < total
            self._probe_and_save(done, total, out.stopped_early)
            if out.stopped_early:
                break
            if (new := self.budget.replan(done, total, log_now)) is not None:
                self._go_to(done, new)
            out.cut_short = self.budget.cut_short(done, self.total, log_now)
        gen.close()
        synchronize(self.trainer.device)
        out.done, out.train_s = it, self.budget.train_s()
        return out
