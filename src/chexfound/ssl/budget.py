"""Fitting a pretraining run to a wall-clock budget (`train.time_budget_s`): measure, plan, turn down.

The budget counts from the start of `pretrain()`. Everything the fit uses is measured in this process, after
warm-up (`ProbeRunner.measure_costs`, `measure_save_cost`, `calibrate_step`):

  step_s      one training iteration: the median of timed iterations after an untimed first one (allocator,
              kernel selection, compilation). The timed iterations are the run's own first iterations, run at
              learning rate 0 (the warm-up starts from 0 anyway), so calibration costs no training. On a CPU
              without compilation, a first iteration longer than 2% of the budget is timed itself (no warm-up
              there worth a second slow iteration).
  decode_s    one probe image decoded: timed on the smallest final Kermany set (decoded for the measurements).
  feature_s   one image through one backbone for a probe (an untimed warm-up batch, then timed batches).
  fit_s       the logistic probe per (train image x feature x finding): timed on the pixel baseline of that
              smallest Kermany set (kept for the end), then on every periodic probe's own fit.
  ckpt_s / end_s   one checkpoint, and the end's checkpoint + teacher exports: the state copy is timed, the
              file writes are their bytes over a timed write of the teacher backbone.

Probe sets are decoded when first needed, so a set the plan turns down is never decoded. The probes (their
decoding included) and the exports may keep at most `budget.max_probe_fraction` of the budget (most of it goes
to training). When the configured probes need more, they are turned down, in this order, until they fit:
  1. fewer periodic probes (halved down to none; the iteration-0 probe goes last),
  2. smaller final sets (each task's train and test images halved, down to `budget.min_final_images`),
  3. fewer random-init baselines (down to one),
  4. fewer final tasks (NIH-14 first, then Kermany: no final comparison at all).
Each turn-down is printed and written to metrics.jsonl (`kind: budget`). `budget.margin_fraction` of the
budget is kept for the report and the unexpected, so a run ends just inside its budget; the iteration count is
the one whose end lands nearest the budget, never more than `budget.tolerance_fraction` over it.

While the run goes, the plan is corrected and `Deadline` keeps it honest: in the first part of the run
(`budget.replan_until` of the planned iterations) the total is refitted to the pace measured so far whenever
it would change by more than `budget.replan_threshold` (`replan_total`); after that, training stops early (and
says so) if it falls behind, a periodic probe that no longer fits is skipped, and the final probes are
re-planned against the time actually left. `BudgetPolicy` takes these decisions for the training loop and the
end, and calibrates and fits the run as the loop's first iterations (`measure`, `timed`); `BudgetState` is what a
resume keeps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from chexfound.ssl.probe_plan import (PERIODIC, STAGES, FinalSet, ProbeCosts, ProbePlan, plan_from_config,
                                      probe_iterations, set_key, turn_down)

__all__ = ["BudgetFit", "BudgetPolicy", "BudgetState", "Clock", "Deadline", "FinalSet", "PERIODIC",
           "ProbeCosts", "ProbePlan", "STAGES", "StepCalibration", "calibrate_step", "fit_budget",
           "iterations_that_fit", "plan_from_config", "probe_iterations", "replan_total", "set_key", "turn_down"]

Clock = Callable[[], float]


@dataclass
class BudgetFit:
    budget_s: float
    elapsed_s: float  # spent before training proper (data, model, probe sets, measurements, calibration)
    step_s: float
    done: int  # iterations already run (the calibration's)
    total: int
    epoch_length: float
    reserve_s: float  # periodic + final probes + exports
    margin_s: float
    train_s: float  # planned for the remaining iterations
    plan: ProbePlan
    over_cap: bool  # even the smallest probes exceed budget.max_probe_fraction

    def row(self) -> dict[str, Any]:
        return {"kind": "budget", "event": "plan", **{k: v for k, v in asdict(self).items() if k != "plan"},
                "plan": self.plan.to_dict(), "turned_down": self.plan.turned_down}

    def message(self) -> str:
        s = (f"time budget {self.budget_s:.0f}s: {self.elapsed_s:.0f}s spent on setup, "
             f"{self.step_s * 1000:.0f} ms/iteration -> {self.total} iterations ({self.train_s:.0f}s of training), "
             f"{self.reserve_s:.0f}s kept for probes and exports, {self.margin_s:.0f}s margin")
        if self.plan.turned_down:
            s += "; probes turned down to fit: " + "; ".join(self.plan.turned_down)
        if self.over_cap:
            s += " (even the smallest probes exceed budget.max_probe_fraction: the budget is too small for them)"
        if self.total == self.done:
            s += "; setup spent the budget: no iteration beyond the timed ones (at learning rate 0)"
        return s


def iterations_that_fit(train_s: float, per_it_s: float, tolerance_s: float) -> int:
    """The count of iterations whose end lands nearest `train_s` seconds, but never more than `tolerance_s` past
    it (a long step that would overshoot further is left out); none when no time is left."""
    more = max(0, round(train_s / max(per_it_s, 1e-9)))
    while more > 0 and more * per_it_s - train_s > tolerance_s:
        more -= 1
    return more


def replan_total(done: int, total: int, pace_s: float, training_left_s: float, tolerance_s: float,
                 min_change: float) -> int | None:
    """The new total when the pace measured in the run (`pace_s` per iteration, checkpoints included) would
    end training more than `min_change` of the planned iterations away from `total` in the `training_left_s`
    still left for it (periodic probes already taken out); None to keep the plan. A step timed once at the
    start is a noisy estimate: a CPU's first step is slow, other jobs come and go, so the plan is corrected
    while the schedules can still absorb it rather than ending far early or being cut short."""
    new = done + iterations_that_fit(training_left_s, pace_s, tolerance_s)
    new = max(new, done + 1)  # a run behind its plan is cut by the deadline, not here
    if abs(new - total) <= min_change * total:
        return None
    return new


def fit_budget(budget_s: float, elapsed_s: float, step_s: float, done: int, costs: ProbeCosts, plan: ProbePlan,
               bcfg: dict[str, Any], epochs: float, ckpt_every: int,
               done_sizes: dict[str, tuple[int, int]] | None = None,
               decoded: set[str] | frozenset[str] = frozenset()) -> BudgetFit:
    """Total iterations and the probe plan that fit `budget_s` (see the module docstring). `done_sizes`: final
    tasks whose pixel baseline is already fitted (task -> (n_train, n_test)); `decoded`: probe sets already
    decoded (`set_key`)."""
    cap = float(bcfg["max_probe_fraction"]) * budget_s
    margin = float(bcfg["margin_fraction"]) * budget_s

    def reserve_of(p: ProbePlan) -> float:
        return costs.reserve_s(p, done_sizes, decoded)

    fitted = turn_down(plan, reserve_of, cap, int(bcfg["min_final_images"]))
    reserve = reserve_of(fitted)
    train_s = budget_s - elapsed_s - reserve - margin
    per_it = step_s + (costs.ckpt_s / ckpt_every if ckpt_every else 0.0)
    # the count whose end lands nearest the budget, but never more than the tolerance over it (a long step
    # that would overshoot further is left out); none when setup already spent the budget
    tol = float(bcfg.get("tolerance_fraction", 0.05)) * budget_s
    more = iterations_that_fit(train_s, per_it, tol)
    total = done + more
    return BudgetFit(budget_s=budget_s, elapsed_s=elapsed_s, step_s=step_s, done=done, total=total,
                     epoch_length=total / max(float(epochs), 1e-9), reserve_s=reserve, margin_s=margin,
                     train_s=max(0.0, more * per_it), plan=fitted, over_cap=reserve > cap)


class StepCalibration:
    """The step's calibration, one iteration at a time (`add` each iteration's seconds until it says done):
    the first iteration untimed (warm-up: allocator, kernel selection, compilation), then up to `max_timed`
    timed ones, fewer when they would take more than `max_fraction` of the budget (at least one).
    `warmup_free` (a CPU without compilation: no kernels to pick or compile): when the first iteration alone takes
    more than `max_fraction` of the budget, its time is the estimate and no further iteration is spent on timing.
    `agree`: every stop decision goes through it (rank 0's on every rank: the steps are collectives, so a
    decision from each rank's own clock could leave one rank waiting in a step the others never run)."""

    def __init__(self, budget_s: float, max_timed: int = 3, max_fraction: float = 0.02, warmup_free: bool = False,
                 agree: Callable[[bool], bool] = bool) -> None:
        self.limit_s, self.max_timed, self.warmup_free, self.agree = max_fraction * budget_s, max_timed, warmup_free, agree
        self.first: float | None = None
        self.times: list[float] = []
        self.step_s = 0.0  # the estimate, once done

    def add(self, seconds: float) -> bool:
        """One more iteration took `seconds`; True when the estimate (`step_s`) is made."""
        if self.first is None:
            self.first = seconds
            if self.agree(self.warmup_free and seconds > self.limit_s):
                self.step_s = seconds
                return True
            return False
        self.times.append(seconds)
        if not self.agree(len(self.times) >= self.max_timed or sum(self.times) + seconds > self.limit_s):
            return False
        self.step_s = sorted(self.times)[len(self.times) // 2]  # the median
        return True


def calibrate_step(run_step: Callable[[int], Any], sync: Callable[[], None], budget_s: float, clock: Clock,
                   max_timed: int = 3, max_fraction: float = 0.02, warmup_free: bool = False,
                   agree: Callable[[bool], bool] = bool) -> tuple[float, int]:
    """`StepCalibration` over `run_step(0)`, `run_step(1)`, ...: (median seconds per iteration, iterations run)."""
    timer = StepCalibration(budget_s, max_timed, max_fraction, warmup_free, agree)
    it = 0
    while True:
        t0 = clock()
        run_step(it)
        sync()
        it += 1
        if timer.add(clock() - t0):
            return timer.step_s, it


@dataclass
class Deadline:
    """The run's clock against its plan: when training must end so the final probes and exports fit."""

    t_start: float
    budget_s: float
    end_reserve_s: float  # final probes + exports + margin, kept after training
    step_s: float
    clock: Clock = time.perf_counter
    tolerance_s: float = float("inf")  # how far past its share training may run for one more step

    def left_s(self) -> float:
        """Seconds left in the whole budget."""
        return self.t_start + self.budget_s - self.clock()

    def training_left_s(self) -> float:
        return self.left_s() - self.end_reserve_s

    def behind(self, next_step_s: float = 0.0) -> bool:
        """Training has used up its share: stop now, keep the time of the end. With `next_step_s`, also when
        less than half the next step is left (stopping then misses the deadline by less than going on would),
        or when the next step would end more than `tolerance_s` past it."""
        left = self.training_left_s()
        return left < 0.5 * next_step_s or next_step_s - left > self.tolerance_s

    def fits(self, probe_s: float, iterations_left: int) -> bool:
        """Whether a periodic probe of `probe_s` still fits before the remaining iterations (with the half
        iteration the plan may run over)."""
        return self.training_left_s() + 0.5 * self.step_s >= probe_s + iterations_left * self.step_s


@dataclass
class BudgetState:
    """What a time-budgeted run keeps across a resume: its probe plan, the measured costs, the time kept for
    the end, the step time it plans with, and the totals it planned."""

    plan: ProbePlan
    costs: ProbeCosts
    end_reserve_s: float
    step_s: float
    budget_s: float
    planned_total: int
    replanned_total: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plan"] = self.plan.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetState | None:
        """None for a run without a budget (an empty dict in form 1)."""
        if not d or "end_reserve_s" not in d:
            return None
        rt = d.get("replanned_total")
        return cls(plan=ProbePlan.from_dict(d["plan"]), costs=ProbeCosts(**d.get("costs", {})),
                   end_reserve_s=float(d["end_reserve_s"]), step_s=float(d["step_s"]),
                   budget_s=float(d.get("budget_s", 0.0)), planned_total=int(d.get("planned_total", 0)),
                   replanned_total=None if rt is None else int(rt))


class BudgetPolicy:
    """The time budget's decisions while a run goes, and the probe plan (with or without a budget): the
    calibration (a new budgeted run's first iterations, timed, then the fit of its length and probes), which
    periodic probes run and whether one still fits, the pace and its re-plans, the deadline, and the final
    probes' plan and margin. It owns the run's clock accounting (training time vs pauses). `ctx`: the
    RunContext; `state`: the budget's state (None without a budget, or before the calibration); `probe_s`: one
    periodic probe's cost."""

    def __init__(self, ctx: Any, plan: ProbePlan, state: BudgetState | None,
                 probe_s: Callable[[ProbePlan], float]) -> None:
        from chexfound.ssl import distributed as D

        self.ctx, self.plan, self.state, self.probe_s = ctx, plan, state, probe_s
        self.calibration_s = 0.0  # seconds of the calibration iterations (training at learning rate 0)
        self.deadline: Deadline | None = None
        self._agree: Callable[[Any], Any] = D.broadcast_object if ctx.info.enabled else (lambda x: x)
        self.calibrating = state is None and bool(ctx.settings.time_budget_s)
        self.timer: StepCalibration | None = None
        self._set_deadline()
        self.probe_at: set[int] = set()
        self.probes_left = 0
        self.pause_s = 0.0  # probes and checkpoints: not training
        self.t_loop = self.t_prev = self.t_pause = 0.0
        self.step_est = 0.0  # seconds per iteration, as seen
        # the pace window: (clock, iteration, pauses so far) where it opened (the loop's start, or a rollback's
        # rerun); the pace is measured over all of it, so a short burst of other jobs does not swing the plan
        self.pace_from = (0.0, 0, 0.0)
        self.replanned_at = -1  # iteration of the last re-plan that changed the total

    def _set_deadline(self) -> None:
        s, state = self.ctx.settings, self.state
        if state is not None and s.time_budget_s:
            self.deadline = Deadline(self.ctx.t_start - self.ctx.elapsed_before, s.time_budget_s, state.end_reserve_s,
                                     state.step_s, self.ctx.clock,
                                     tolerance_s=float(s.budget["tolerance_fraction"]) * s.time_budget_s)

    # -- calibration: a new budgeted run's first iterations --------------------------------------------
    def measure(self, trainer: Any, corpus: Any, prober: Any) -> None:
        """Before the calibration iterations: what the probes (`ProbeRunner.measure_costs`, on the run's first
        batch), a checkpoint and the end cost; then the step timer for the iterations that follow."""
        from chexfound.ssl import distributed as D
        from chexfound.ssl.checkpoint import measure_save_cost

        s, budget = self.ctx.settings, float(self.ctx.settings.time_budget_s)
        gen = corpus.source.batches(0)
        sample = next(gen)[1]  # the first batch (resident, or decoded for it): what feature timing runs on
        gen.close()
        min_images, cap = int(s.budget["min_final_images"]), float(s.budget["max_probe_fraction"]) * budget

        def worth(c: ProbeCosts) -> bool:  # timing decoding and fits is wasted when no probe could fit anyway
            lower = turn_down(self.plan, c.reserve_s, cap, min_images)
            return bool(lower.finals or lower.periodic)

        self.costs = prober.measure_costs(self.plan, min_images, sample, worth)
        ckpt_s, end_s = measure_save_cost(trainer, self.ctx.out, self.ctx.clock, shards=bool(s.export_bf16_shard_mib))
        self.costs.ckpt_s, self.costs.end_s = D.broadcast_object((ckpt_s, end_s))
        self.done_sizes, self.decoded = D.broadcast_object(({k: v[0] for k, v in prober.pixel_scores.items()},
                                                            prober.decoded))
        warmup_free = trainer.device.type == "cpu" and not self.ctx.cfg["train"]["compile"]
        self.timer = StepCalibration(budget, warmup_free=warmup_free, agree=lambda flag: bool(D.broadcast_object(bool(flag))))
        self.t_calibration = self.ctx.clock()

    def timed(self, done: int, seconds: float, device: Any) -> BudgetFit | None:
        """Calibration iteration `done` took `seconds`: None while the timer needs more, then the fit (the
        run's length and probe plan; printed and logged) with the deadline set from it."""
        import torch

        from chexfound.ssl import distributed as D

        assert self.timer is not None, "measure() opens the calibration"
        if not self.timer.add(seconds):
            return None
        self.calibration_s = self.ctx.clock() - self.t_calibration
        step_t = torch.tensor([self.timer.step_s], device=device)
        D.all_reduce_max(step_t)  # the slowest rank sets the pace
        step_s, s, c = float(step_t.item()), self.ctx.settings, self.costs
        fit = fit_budget(float(s.time_budget_s), self.ctx.elapsed(), step_s, done, c, self.plan, s.budget, s.epochs,
                         s.ckpt_every, self.done_sizes, self.decoded)
        fit = D.broadcast_object(fit)
        self.ctx.say(fit.message())
        self.ctx.metrics.write_row({**fit.row(), "costs": asdict(c)})
        end_reserve = c.final_probes_s(fit.plan, self.done_sizes, self.decoded) + c.end_s + fit.margin_s
        self.plan = fit.plan
        self.state = BudgetState(fit.plan, c, end_reserve, step_s, float(s.time_budget_s), fit.total)
        self._set_deadline()
        self.calibrating, self.timer = False, None
        return fit

    def _event(self, row: dict[str, Any], line: str | None = None) -> None:
        self.ctx.metrics.write_row({"kind": "budget", **row})
        if line:
            self.ctx.say(line)

    # -- the loop's clock ------------------------------------------------------------------------------
    def start(self, it: int, total: int) -> None:
        self.probe_at = probe_iterations(total, self.plan.periodic - 1)
        self.probes_left = len({p for p in self.probe_at if p > it})
        self.t_loop = self.t_prev = self.ctx.clock()
        self.pace_from = (self.t_loop, it, 0.0)
        self.step_est = self.deadline.step_s if self.deadline is not None else 0.0

    def restart(self, it: int) -> None:
        """A rollback reruns from `it`: the pace window opens again there."""
        self.t_prev = self.ctx.clock()
        self.pace_from = (self.t_prev, it, self.pause_s)

    def pause(self) -> None:
        """Training stops for this iteration (probes and checkpoints follow)."""
        self.t_pause = self.ctx.clock()

    def resume(self) -> None:
        now = self.ctx.clock()
        self.pause_s += now - self.t_pause
        # this iteration's time (a GPU step's host time is short until a log step waits: averaged out)
        step = self.t_pause - self.t_prev
        self.step_est = 0.7 * self.step_est + 0.3 * step if self.step_est else step
        self.t_prev = now

    def train_s(self) -> float:
        """Seconds of training steps so far in this process (calibration included)."""
        return self.calibration_s + self.ctx.clock() - self.t_loop - self.pause_s

    # -- probe? ----------------------------------------------------------------------------------------
    def probe_now(self, done: int, total: int) -> bool:
        """Whether the periodic probe planned at `done` (if any) runs: it is skipped when training is behind."""
        if done not in self.probe_at:
            return False
        self.probes_left -= 1
        d = self.deadline
        if self._agree(d is None or d.fits(self.probe_s(self.plan), total - done)):
            return True
        self._event({"event": "probe_skipped", "iteration": done},
                    f"budget: periodic probe at iteration {done} skipped (training is behind its plan)")
        return False

    # -- budget? ---------------------------------------------------------------------------------------
    def replan(self, done: int, total: int, log_now: bool) -> int | None:
        """At a log step: refit the total to the pace measured since the window opened (budget.replan_until /
        replan_threshold), at least 10 iterations (a quarter of a plan shorter than 40; and 5% of the run) after
        the window opened and after the last change; the new total, or None when the plan holds. Rank 0 decides
        for every rank."""
        d, b, s = self.deadline, self.ctx.settings.budget, self.ctx.settings
        if d is None or self.state is None or not log_now or done >= total:
            return None
        t0, it0, p0 = self.pace_from
        # a short plan cannot wait 10 iterations: a quarter of it will do (a step timed once, in a burst of
        # other work on the cores, can be off many times over, and the run would end far inside its budget)
        n, gap = done - it0, max(min(10.0, 0.25 * total), 0.05 * total)
        if done > float(b.get("replan_until", 0.0)) * total or n < gap or done - self.replanned_at < gap:
            return None
        now = self.ctx.clock()
        pace = (now - t0 - (self.pause_s - p0)) / n + (self.state.costs.ckpt_s / s.ckpt_every if s.ckpt_every else 0.0)
        left = d.training_left_s() - self.probes_left * self.probe_s(self.plan)
        new = self._agree(replan_total(done, total, pace, left, d.tolerance_s, float(b.get("replan_threshold", 0.05))))
        if new is None:
            return None
        d.step_s = self.state.step_s = pace  # what the deadline and a resume expect from now on
        self.state.replanned_total = int(new)
        self.replanned_at = done
        self.probe_at = probe_iterations(int(new), self.probes_left, done)
        self._event({"event": "replan", "iteration": done, "planned_iterations": total, "total": int(new),
                     "step_s": pace, "training_left_s": left, "elapsed_s": self.ctx.elapsed()},
                    f"budget: re-planned at iteration {done}: {total} -> {int(new)} iterations "
                    f"({pace * 1000:.0f} ms/iteration measured, {left:.0f}s of training left)")
        return int(new)

    def cut_short(self, done: int, total: int, log_now: bool) -> str | None:
        """Why training stops at `done` before `total` (it fell behind its plan), or None to go on."""
        d = self.deadline
        if d is None or done >= total or (self.ctx.info.enabled and not log_now):
            return None
        if not self._agree(d.behind(next_step_s=max(self.step_est, d.step_s))):
            return None
        msg = (f"budget: training stopped at iteration {done} of {total}: it fell behind its plan (slower "
               "steps or longer probes than measured); the end keeps its time")
        self._event({"event": "cut_short", "iteration": done, "planned_iterations": total,
                     "elapsed_s": self.ctx.elapsed()}, msg)
        return msg

    # -- the end ---------------------------------------------------------------------------------------
    def account(self, done: int, planned: int, train_s: float) -> None:
        """The run's closing row (`event: end`) and line: the time used, against the budget, and how much of
        it went to training."""
        s, took = self.ctx.settings, self.ctx.elapsed()
        row = {"event": "end", "iterations": done, "planned_iterations": planned, "elapsed_s": took,
               "training_s": train_s, "training_fraction": train_s / max(took, 1e-9)}
        used = ""
        if s.time_budget_s:
            row.update(budget_s=s.time_budget_s, budget_used=took / s.time_budget_s)
            used = f" (budget {s.time_budget_s:.0f}s: {100 * took / s.time_budget_s:.0f}% used)"
        self._event(row, f"done in {took:.0f}s{used}, {train_s:.0f}s of it training "
                         f"({100 * train_s / max(took, 1e-9):.0f}%); run folder {self.ctx.out}")

    def final_plan(self, cost: Callable[[ProbePlan], float], plot_s: float) -> ProbePlan:
        """The final probes re-planned against the time actually left (a margin for the report kept)."""
        d = self.deadline
        if d is None:
            return self.plan
        fitted = turn_down(self.plan, cost, d.left_s() - self.end_margin_s(plot_s),
                           int(self.ctx.settings.budget["min_final_images"]),
                           stages=("final_sets", "random_seeds", "final_tasks"))
        new = fitted.turned_down[len(self.plan.turned_down):]
        if new:
            self._event({"event": "final_turned_down", "turned_down": new, "left_s": d.left_s()},
                        "final probes turned down to fit the time left: " + "; ".join(new))
        return fitted

    def end_margin_s(self, plot_s: float) -> float:
        """Kept after the final probes: the report's drawing and half the budget's margin."""
        s = self.ctx.settings
        return plot_s + 0.5 * float(s.budget["margin_fraction"]) * (s.time_budget_s or 0.0)

    def final_fits(self, seconds: float, plot_s: float) -> bool:
        """Whether an optional final probe of `seconds` still fits."""
        return self.deadline is None or self.deadline.left_s() - self.end_margin_s(plot_s) >= seconds
