"""The loop of a pretraining run: steps, log rows, checkpoints, periodic probes, divergence and rollback, and
the time budget's deadline. One object, `TrainLoop`, so the state they share (the trainer, the last good
checkpoint, the collapse monitor, the healer) lives in one place."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from chexfound.ssl import distributed as D
from chexfound.ssl.budget import Deadline, ProbePlan, replan_total
from chexfound.ssl.checkpoint import list_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from chexfound.ssl.data import Corpus
from chexfound.ssl.diagnostics import CollapseMonitor, plot_report
from chexfound.ssl.heal import Divergence, DivergedError, Healer, adjust_schedules, cpu_copy
from chexfound.ssl.meta_arch import all_reduce_stats
from chexfound.ssl.run_context import PrintedLog, RunContext
from chexfound.ssl.trainer import NonFiniteLossError, Trainer


def probe_iterations(total: int, n_evals: int) -> set[int]:
    """Iterations of the periodic probes (evenly spaced, neither 0 nor the end)."""
    if n_evals <= 0:
        return set()
    return {int(round(total * (k + 1) / (n_evals + 1))) for k in range(n_evals)} - {0, total}


@dataclass
class RunLength:
    """How long the run trains and which probes it runs (fixed by the config or by the budget's fit)."""

    total: int
    epoch_length: float
    plan: ProbePlan
    deadline: Deadline | None = None
    budget_state: dict[str, Any] = field(default_factory=dict)  # stored in checkpoints (resume keeps the plan)
    calibration_s: float = 0.0  # training time spent in the budget's calibration iterations

    @property
    def probe_at(self) -> set[int]:
        return probe_iterations(self.total, self.plan.periodic - 1)

    def probes_after(self, done: int, left: int) -> set[int]:
        """After a re-plan: the `left` periodic probes not yet run, spread evenly over the rest of the run."""
        rest = self.total - done
        return {done + int(round(rest * (k + 1) / (left + 1))) for k in range(left)} - {done, self.total}


@dataclass
class LoopOutcome:
    done: int  # iterations completed
    stopped_early: bool = False  # `stop_after`
    cut_short: str | None = None  # the budget's deadline ended training before `total`
    train_s: float = 0.0  # seconds of training steps (probes and checkpoints left out)


class TrainLoop:
    def __init__(self, ctx: RunContext, trainer: Trainer, corpus: Corpus, prober: Any, length: RunLength,
                 monitor: CollapseMonitor, healer: Healer) -> None:
        self.ctx, self.trainer, self.corpus, self.prober, self.length = ctx, trainer, corpus, prober, length
        self.monitor, self.healer = monitor, healer
        self.last_good: Path | None = latest_checkpoint(ctx.out)
        self.last_plot = -math.inf
        self.plot_s = 0.0  # how long the report took to draw (the end keeps that much time for it)
        self.bar: Any = None
        self.unhealed: set[str] = set()  # divergence signals seen with healing off (logged once each)
        # the pace window: (clock, iteration, pauses so far) where it opened (the loop's start, or a rollback's
        # rerun); the pace is measured over all of it, so a short burst of other jobs does not swing the plan
        self.pace_from: tuple[float, int, float] | None = None
        self.replanned_at = -1  # iteration of the last re-plan check that changed the total

    # -- schedules, with what rollbacks changed ------------------------------------------------------------
    def apply_schedules(self) -> None:
        self.trainer.set_schedules(self.length.total, self.length.epoch_length)  # type: ignore[arg-type]
        st = self.healer.state
        self.trainer.schedules = adjust_schedules(self.trainer.schedules, st.lr_scale, st.ema_gap_scale)

    # -- log rows ------------------------------------------------------------------------------------------
    def train_row(self, done: int, red: dict[str, float], ips: float, lr_zero: bool = False) -> dict[str, Any]:
        sc = self.trainer.schedules.at(done - 1)  # type: ignore[union-attr]
        if lr_zero:  # the budget's calibration iterations run at learning rate 0
            sc = {**sc, "lr": 0.0, "last_layer_lr": 0.0}
        return {"kind": "train", "iteration": done, "epoch": self.corpus.sampler.epoch_of(done), **red, **sc,
                "images_per_s": ips, "elapsed_s": self.ctx.elapsed(), "n_skipped": len(self.corpus.skipped.items)}

    def log_calibration(self, steps: list[tuple[int, dict[str, torch.Tensor], int, float]]) -> None:
        """Rows for the budget's calibration iterations (run at learning rate 0) that fall on log steps."""
        for done, stats, n_images, seconds in steps:
            if done % self.ctx.settings.log_every == 0 or done == 1:
                red = all_reduce_stats(stats, self.ctx.info.device)
                self.log_row(done, red, n_images / max(seconds, 1e-9), lr_zero=True)

    def log_row(self, done: int, red: dict[str, float], ips: float, lr_zero: bool = False) -> None:
        ctx = self.ctx
        ctx.metrics.write_row(self.train_row(done, red, ips, lr_zero))
        if not all(math.isfinite(v) for v in red.values()):
            return
        warn = self.monitor.check(done, red, 2 * self.ctx.settings.batch_size)
        if warn and ctx.info.is_main:
            ctx.say(f"WARNING: {warn}")
            ctx.metrics.write_row({"kind": "warning", "iteration": done, "message": warn})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{red['loss']:.3f}", img_s=f"{ips:.1f}", protos=int(red["prototypes_in_use"]))

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(self, done: int, total: int | None = None) -> Path | None:
        ctx = self.ctx
        state = self.trainer.state()  # collective under FSDP
        path = None
        if ctx.info.is_main:
            extra = {"total_iterations": total or self.length.total, "epoch_length": self.length.epoch_length,
                     "monitor": self.monitor.state_dict(), "elapsed_s": ctx.elapsed(),
                     "heal": self.healer.state_dict(), "budget": self.length.budget_state}
            path = save_checkpoint(ctx.out, done, {**state, "state": extra}, ctx.cfg, ctx.settings.keep_last)
            if self.corpus.skipped.items:
                self.corpus.skipped.write(ctx.out / "skipped.txt")
            if ctx.clock() - self.last_plot > 120:  # the report is refreshed at most every 2 min
                t0 = ctx.clock()
                plot_report(ctx.out / "metrics.jsonl", ctx.out / "report.png", title=str(ctx.out))
                self.last_plot = ctx.clock()
                self.plot_s = self.last_plot - t0
        D.barrier()
        self.last_good = path or self.last_good
        return path

    # -- divergence -------------------------------------------------------------------------------------------
    def _give_up(self, div: Divergence) -> NoReturn:
        if self.bar is not None:
            self.bar.close()
        msg = self.healer.give_up_message(div, self.last_good)
        self.ctx.metrics.write_row({"kind": "gave_up", "iteration": div.iteration, "reason": div.reason, "message": msg})
        raise (NonFiniteLossError if div.reason == "nonfinite" else DivergedError)(msg)

    def roll_back(self, div: Divergence) -> int | None:
        """Restore the newest good state before `div.onset` with gentler settings; the iteration to go on
        from, or None when the signal is not acted on (healing off, and not a non-finite loss)."""
        ctx, hc = self.ctx, self.healer.hc
        if not hc.enabled and div.reason != "nonfinite":
            if div.reason not in self.unhealed:  # logged, once per signal
                self.unhealed.add(div.reason)
                msg = f"{div.detail}; not acted on (heal.enabled=false)"
                ctx.metrics.write_row({"kind": "warning", "iteration": div.iteration, "message": msg})
                ctx.say(f"WARNING: {msg}")
            return None
        if not self.healer.can_roll_back():
            self._give_up(div)
        disk = {it: p for it, p in list_checkpoints(ctx.out)}
        target = self.healer.pick([s.iteration for s in self.healer.snapshots] + list(disk), div.onset)
        if target is None:
            self._give_up(div)
        snap = self.healer.snapshot_at(target)
        if snap is not None:  # memory first: same state, no disk read
            # a copy: on the CPU the optimizer would adopt the snapshot's tensors (same device and dtype) and
            # its in-place updates would rewrite the snapshot a later rollback may go back to
            payload, loop, source = cpu_copy(snap.payload), snap.loop, "memory snapshot"
        else:
            payload = load_checkpoint(disk[target])
            loop, source = payload.get("state", {}), str(disk[target])
        self.trainer.load_state(payload)
        self._drop_damaged_checkpoints(div, disk)
        self.monitor = CollapseMonitor(self.length.total)
        self.monitor.load_state_dict(loop.get("monitor", {}))
        row = self.healer.record(div, target, source)
        self.apply_schedules()
        ctx.metrics.abandon_after(target)
        ctx.metrics.write_row({**row, "elapsed_s": ctx.elapsed()})
        line = (f"ROLLBACK {row['rollback']}/{hc.max_rollbacks}: {div.detail}; back to iteration {target} "
                f"({source}); lr x{row['lr_scale']:g}, EMA gap x{row['ema_gap_scale']:g} from now on")
        ctx.say(line)
        return target

    def _drop_damaged_checkpoints(self, div: Divergence, disk: dict[int, Path]) -> None:
        """The checkpoints written between the divergence's first flagged step and its detection hold the
        damage: a resume must not continue from one, nor may one be named the last good checkpoint. (Newer
        ones come from before an earlier rollback, when this stretch was run without the damage.)"""
        damaged = {it for it in disk if div.onset < it < div.iteration}
        if self.ctx.info.is_main:
            for it in damaged:
                disk[it].unlink(missing_ok=True)
                disk[it].with_suffix(".yaml").unlink(missing_ok=True)
        D.barrier()
        kept = [p for it, p in sorted(disk.items()) if it not in damaged]
        self.last_good = kept[-1] if kept else None

    def _snapshot(self, done: int) -> None:
        if self.healer.want_snapshot(done):
            self.healer.snapshot(done, self.trainer.state(), {"monitor": self.monitor.state_dict()})

    # -- the deadline ----------------------------------------------------------------------------------------
    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank (a time-based choice must not split the ranks)."""
        return bool(D.broadcast_object(flag)) if self.ctx.info.enabled else flag

    def replan(self, done: int, now: float, pause_s: float, probes_left: int) -> int | None:
        """Refit the total to the pace measured since the window opened (budget.replan_until /
        replan_threshold), at least 10 iterations (and 5% of the run) after the window opened and after the last
        change; the new total, or None when the plan holds. Rank 0 decides for every rank."""
        length, s = self.length, self.ctx.settings
        d, b = length.deadline, s.budget
        if d is None or self.pace_from is None:
            return None
        t0, it0, p0 = self.pace_from
        n, gap = done - it0, max(10.0, 0.05 * length.total)
        if done > float(b.get("replan_until", 0.0)) * length.total or n < gap or done - self.replanned_at < gap:
            return None
        ckpt_s = float(length.budget_state.get("costs", {}).get("ckpt_s", 0.0))
        pace = (now - t0 - (pause_s - p0)) / n + (ckpt_s / s.ckpt_every if s.ckpt_every else 0.0)
        left = d.training_left_s() - probes_left * self.prober.probe_s(length.plan)
        new = replan_total(done, length.total, pace, left, d.tolerance_s, float(b.get("replan_threshold", 0.05)))
        new = D.broadcast_object(new) if self.ctx.info.enabled else new
        if new is None:
            return None
        old, length.total = length.total, int(new)
        d.step_s = pace  # what the deadline and a resume expect from now on
        length.budget_state.update(step_s=pace, replanned_total=length.total)
        self.apply_schedules()
        self.replanned_at = done
        self.ctx.metrics.write_row({"kind": "budget", "event": "replan", "iteration": done, "planned_iterations": old,
                                    "total": length.total, "step_s": pace, "training_left_s": left,
                                    "elapsed_s": self.ctx.elapsed()})
        line = (f"budget: re-planned at iteration {done}: {old} -> {length.total} iterations "
                f"({pace * 1000:.0f} ms/iteration measured, {left:.0f}s of training left)")
        self.ctx.say(line)
        if self.bar is not None:
            self.bar.total = length.total
            self.bar.refresh()
        return length.total

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self, start: int, stop_after: int | None = None) -> LoopOutcome:
        if self.ctx.info.is_main and not self.ctx.quiet and start < self.length.total:
            from tqdm import tqdm

            self.bar = tqdm(total=self.length.total, initial=start, desc="pretrain", unit="it", dynamic_ncols=True)
        # while the bar is up, the run's lines are written through it (and still to pretrain.log)
        say = self.ctx.say
        routed = say.echoing_to(self.bar.write) if self.bar is not None and isinstance(say, PrintedLog) \
            else contextlib.nullcontext()
        try:
            with routed:
                return self._run(start, stop_after)
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def _run(self, start: int, stop_after: int | None) -> LoopOutcome:
        ctx, trainer, length = self.ctx, self.trainer, self.length
        total, s = length.total, ctx.settings
        out = LoopOutcome(done=start, train_s=length.calibration_s)
        if start >= total:
            return out
        probe_at = length.probe_at
        probes_left = len({p for p in probe_at if p > start})
        self._snapshot(start)
        t_loop = last_t = ctx.clock()
        pause_s = 0.0  # probes and checkpoints
        self.pace_from = (t_loop, start, 0.0)
        images_since = 0
        gen = self.corpus.source.batches(start)
        it = start
        step_est = length.deadline.step_s if length.deadline is not None else 0.0  # seconds per iteration, as seen
        t_prev = ctx.clock()
        while it < total:
            _, images, _ = next(gen)
            try:
                stats = trainer.train_step(it, images)
                div = None
            except NonFiniteLossError as e:  # a trainer that checks every step raises at once
                div = Divergence("nonfinite", it + 1, it, str(e))
            done = it + 1
            images_since += images.shape[0] * ctx.info.world_size
            log_now = done % s.log_every == 0 or done == total or done == 1
            if div is None and log_now:
                now = ctx.clock()
                red = all_reduce_stats(stats, ctx.info.device)
                ips = images_since / max(now - last_t, 1e-9)
                last_t, images_since = now, 0
                self.log_row(done, red, ips)
                div = self.healer.detector.observe(done, red)
            if div is not None:
                target = self.roll_back(div)
                if target is not None:
                    gen.close()
                    gen = self.corpus.source.batches(target)
                    it = target
                    if self.bar is not None:
                        self.bar.n = target
                        self.bar.refresh()
                    last_t, images_since = ctx.clock(), 0
                    t_prev = ctx.clock()
                    self.pace_from = (t_prev, target, pause_s)  # the pace window restarts with the rerun
                    continue
            if log_now:
                self._snapshot(done)
            if self.bar is not None:
                self.bar.update(1)
            t_pause, paused = ctx.clock(), False
            if done in probe_at:
                paused, probes_left = True, probes_left - 1
                fits = length.deadline is None or length.deadline.fits(self.prober.probe_s(length.plan), total - done)
                if self._agree(fits):
                    self.prober.periodic(done, ctx.metrics)
                else:
                    ctx.metrics.write_row({"kind": "budget", "event": "probe_skipped", "iteration": done})
                    ctx.say(
                        f"budget: periodic probe at iteration {done} skipped (training is behind its plan)")
            if s.ckpt_every and done % s.ckpt_every == 0 and done < total:
                paused = True
                self.save(done)
            if stop_after is not None and done >= stop_after and done < total:
                self.save(done)
                out.stopped_early = True
            if paused:  # probes and checkpoints are not training, nor part of the next images/s
                pause_s += ctx.clock() - t_pause
                last_t, images_since = ctx.clock(), 0
            now = ctx.clock()
            # this iteration's time (a GPU step's host time is short until a log step waits: averaged out)
            step_est = 0.7 * step_est + 0.3 * (t_pause - t_prev) if step_est else t_pause - t_prev
            t_prev = now
            it = done
            if out.stopped_early:
                break
            if log_now and done < total and self.replan(done, now, pause_s, probes_left) is not None:
                total = length.total
                probe_at = length.probes_after(done, probes_left)
            if length.deadline is not None and done < total and (not ctx.info.enabled or log_now):
                if self._agree(length.deadline.behind(next_step_s=max(step_est, length.deadline.step_s))):
                    out.cut_short = (f"budget: training stopped at iteration {done} of {total}: it fell behind its "
                                     "plan (slower steps or longer probes than measured); the end keeps its time")
                    ctx.say(out.cut_short)
                    ctx.metrics.write_row({"kind": "budget", "event": "cut_short", "iteration": done,
                                       "planned_iterations": total, "elapsed_s": ctx.elapsed()})
                    break
        gen.close()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        out.done = it
        out.train_s += ctx.clock() - t_loop - pause_s
        return out
