"""The run controller's policies driven directly, without a model: the health policy (collapse signal,
snapshots, rollback targets, give-up) with scripted stats and a stand-in trainer, the budget policy (probes,
re-plans, the deadline) on a fake clock, and the run state read back from both checkpoint forms."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from chexfound.ssl.budget import BudgetPolicy, BudgetState, ProbeCosts, ProbePlan
from chexfound.ssl.heal import DivergedError, DivergenceDetector, HealConfig, HealPolicy
from chexfound.ssl.run_state import RunState

LN_K = math.log(64)


def _stats(ent=0.9 * LN_K, gn=1.0, protos=20.0, loss=5.0):
    return {"loss": loss, "grad_norm": gn, "teacher_entropy": ent, "teacher_mean_entropy": 3.0,
            "log_n_prototypes": LN_K, "prototypes_in_use": protos, "dino_local_loss": 0.6 * LN_K,
            "dino_global_loss": 0.2 * LN_K}


class Rows:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def write_row(self, row: dict) -> None:
        self.rows.append(row)

    def abandon_after(self, it: int) -> int:
        return 0

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r["kind"] == kind]


def _ctx(tmp_path, clock=lambda: 0.0, **settings):
    said: list[str] = []
    s = SimpleNamespace(**{"time_budget_s": None, "ckpt_every": 0, "budget": {}, "heal": HealConfig(), **settings})
    ctx = SimpleNamespace(out=tmp_path, info=SimpleNamespace(is_main=True, enabled=False), metrics=Rows(),
                          say=said.append, clock=clock, t_start=clock(), elapsed_before=0.0, settings=s,
                          elapsed=lambda: 0.0)
    return ctx, said


# -- health ------------------------------------------------------------------------------------------------
def test_collapse_signal_warns_once_after_the_grace_period_and_its_patience():
    d = DivergenceDetector(HealConfig())
    d.collapse.n_rows = 12
    flat = _stats(ent=0.98 * LN_K)
    assert d.warn(10, flat, total=100) is None  # inside the grace period (15% of the run)
    assert [d.warn(it, flat, total=100) for it in (20, 21)] == [None, None]
    msg = d.warn(22, flat, total=100)  # the third bad row in a row
    assert "near-uniform" in msg and "iteration 22" in msg
    assert d.warn(23, flat, total=100) is None  # said once
    # one-hot: the batch sent to one prototype (judged with at least 8 rows per batch)
    assert [d.warn(it, _stats(protos=1.0), total=100) for it in (30, 31)] == [None, None]
    assert "1 prototype(s)" in d.warn(32, _stats(protos=1.0), total=100)
    d.collapse.n_rows, d.collapse.warned = 4, set()
    assert all(d.warn(it, _stats(protos=1.0), total=100) is None for it in range(40, 45))
    # non-finite stats are the divergence signal's, not a collapse
    assert d.warn(50, _stats(ent=0.98 * LN_K, loss=float("nan")), total=100) is None


class StandInTrainer:
    """Its state is one number: the iteration it was taken at (what a rollback must restore)."""

    sharded = False

    def __init__(self) -> None:
        self.at = 0

    def state(self) -> dict:
        return {"at": self.at}

    def load_state(self, payload: dict) -> None:
        self.at = payload["at"]


def test_heal_policy_rolls_back_to_the_snapshot_before_the_onset_and_gives_up(tmp_path):
    ctx, said = _ctx(tmp_path)
    trainer = StandInTrainer()
    reapplied = []
    hc = HealConfig(min_history=3, patience=2, snapshot_every=4, max_rollbacks=1)
    heal = HealPolicy(hc, ctx, trainer, reapply=lambda: reapplied.append(heal.state.lr_scale))
    heal.snapshot(0)
    target = None
    for it in range(1, 12):
        trainer.at = it
        target = heal.check(it, _stats(gn=100.0 if it >= 10 else 1.0))
        if target is not None:
            break
    # flagged at rows 10 and 11: onset 9; the snapshots are at 0, 4 and 8
    assert (it, target, trainer.at) == (11, 8, 8) and reapplied == [0.5]
    (rb,) = ctx.metrics.of("rollback")
    assert rb["reason"] == "grad_blowup" and rb["source"] == "memory snapshot" and rb["onset"] == 9
    assert said[-1].startswith("ROLLBACK 1/1")
    # the same fault again: no rollback left -> a clear stop
    assert heal.check(9, _stats()) is None and heal.check(10, _stats(gn=100.0)) is None
    with pytest.raises(DivergedError, match="gave up"):
        heal.check(11, _stats(gn=100.0))
    assert ctx.metrics.of("gave_up")


def test_heal_policy_with_healing_off_warns_once(tmp_path):
    ctx, said = _ctx(tmp_path)
    heal = HealPolicy(HealConfig(enabled=False, min_history=3, patience=1), ctx, StandInTrainer())
    for it in range(1, 9):
        assert heal.check(it, _stats(gn=100.0 if it > 5 else 1.0)) is None
    assert len(ctx.metrics.of("warning")) == 1 and "not acted on" in said[0]


# -- budget ------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _budget(tmp_path, clock, step_s=1.0, end_reserve_s=10.0, **bcfg):
    ctx, said = _ctx(tmp_path, clock, time_budget_s=110.0, budget={"tolerance_fraction": 0.05, "replan_until": 0.5,
                                                                   "replan_threshold": 0.05, **bcfg})
    plan = ProbePlan(periodic=3, periodic_train=10, periodic_test=10)
    state = BudgetState(plan, ProbeCosts(), end_reserve_s, step_s, 110.0, 100)
    return BudgetPolicy(ctx, plan, state, probe_s=lambda p: 5.0), ctx, said


def _iterate(b, clock, step_s):
    clock.t += step_s
    b.pause()
    b.resume()


def test_budget_policy_replans_to_the_measured_pace(tmp_path):
    clock = Clock()
    b, ctx, said = _budget(tmp_path, clock)
    b.start(0, 100)
    assert b.probe_at == {33, 67} and b.probes_left == 2
    new = None
    for done in range(1, 21):
        _iterate(b, clock, 0.5)  # twice as fast as calibrated
        new = b.replan(done, 100, log_now=True) or new
        if new:
            break
    # 10 iterations measured (the least): 100 s - 5 s training, 2 probes of 5 s left at 0.5 s per iteration
    assert done == 10 and new == 10 + round((100 - 5 - 10) / 0.5)
    assert b.state.replanned_total == new and b.deadline.step_s == 0.5
    assert ctx.metrics.of("budget")[-1]["event"] == "replan" and "re-planned at iteration 10" in said[-1]
    assert min(b.probe_at) > 10 and len(b.probe_at) == 2  # the probes spread over the new length
    assert b.replan(11, new, log_now=True) is None  # not again right away


def test_budget_policy_replans_a_short_plan_after_a_quarter_of_it(tmp_path):
    """A short budget's step is timed on one or a few iterations: caught in a burst of other work on the cores,
    the estimate can be many times too slow, and a 16-iteration plan never reaches 10 measured iterations."""
    clock = Clock()
    b, ctx, said = _budget(tmp_path, clock, step_s=6.0)  # planned at 6 s/iteration: 16 iterations
    b.start(0, 16)
    new = None
    for done in range(1, 13):
        _iterate(b, clock, 0.5)  # the real pace, 12x faster
        new = b.replan(done, 16, log_now=done % 5 == 0) or new
        if new:
            break
    assert done == 5 and new == 5 + round((100 - 2.5 - 2 * 5.0) / 0.5)  # 2 periodic probes of 5 s still to run
    assert "re-planned at iteration 5: 16 ->" in said[-1]


def test_budget_policy_skips_a_probe_that_no_longer_fits_and_cuts_a_late_run(tmp_path):
    clock = Clock()
    b, ctx, said = _budget(tmp_path, clock, replan_until=0.0)
    b.start(0, 100)
    for done in range(1, 34):
        _iterate(b, clock, 1.2)  # slower than planned, and re-planning is off
    assert not b.probe_now(33, 100)  # 39.6 s used: the rest of the run no longer fits with a probe
    assert ctx.metrics.of("budget")[-1]["event"] == "probe_skipped"
    assert b.cut_short(33, 100, log_now=True) is None
    for done in range(34, 100):
        _iterate(b, clock, 1.2)
        if msg := b.cut_short(done, 100, log_now=True):
            break
    assert done < 100 and "fell behind its plan" in msg and clock.t <= 100.0 + 0.6
    assert b.train_s() == pytest.approx(clock.t)  # no pauses here: all of it was training


def _calibrating_budget(tmp_path, clock, budget_s):
    import torch

    ctx, said = _ctx(tmp_path, clock, time_budget_s=budget_s, epochs=1.0, export_bf16_shard_mib=0,
                     budget={"tolerance_fraction": 0.05, "max_probe_fraction": 0.3, "margin_fraction": 0.02,
                             "min_final_images": 5})
    ctx.cfg = {"train": {"compile": False}}
    b = BudgetPolicy(ctx, ProbePlan(periodic=0, periodic_train=0, periodic_test=0), None, probe_s=lambda p: 0.0)
    assert b.calibrating and b.deadline is None
    # stand-ins: a CPU trainer without compilation (warm-up free), a corpus of one batch, a prober that measured
    trainer = SimpleNamespace(device=torch.device("cpu"), info=SimpleNamespace(is_main=True),
                              state=lambda: {"model": {"teacher.w": torch.zeros(64)}})
    def batches(it):
        yield it, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 0

    corpus = SimpleNamespace(source=SimpleNamespace(batches=batches))
    prober = SimpleNamespace(measure_costs=lambda plan, n, sample, worth: ProbeCosts(feature_s=0.01),
                             pixel_scores={}, decoded=set())
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    b.measure(trainer, corpus, prober)
    return b, ctx, said


def test_budget_policy_calibrates_on_the_first_iterations_then_fits_the_run(tmp_path):
    import torch

    clock = Clock()
    b, ctx, said = _calibrating_budget(tmp_path, clock, 1000.0)
    fits = []
    for done, seconds in enumerate([5.0, 1.0, 3.0, 2.0], 1):  # the first untimed, then three timed: the median
        clock.t += seconds
        fits.append(b.timed(done, seconds, torch.device("cpu")))
    fit = fits[-1]
    assert fits[:3] == [None, None, None] and fit.step_s == 2.0 and fit.done == 4
    assert fit.total == 4 + round((1000.0 - fit.reserve_s - fit.margin_s) / 2.0)
    assert not b.calibrating and b.state.step_s == 2.0 and b.state.planned_total == fit.total
    assert b.deadline is not None and b.deadline.step_s == 2.0 and b.calibration_s == pytest.approx(11.0)
    assert ctx.metrics.of("budget")[0]["event"] == "plan" and f"-> {fit.total} iterations" in said[-1]


def test_budget_policy_calibration_takes_a_slow_first_step_on_a_cpu_as_the_estimate(tmp_path):
    import torch

    b, ctx, said = _calibrating_budget(tmp_path, Clock(), 100.0)
    fit = b.timed(1, 30.0, torch.device("cpu"))  # over 2% of the budget: no second slow step for timing
    assert fit is not None and fit.step_s == 30.0 and fit.done == 1 and not b.calibrating


def test_budget_policy_final_plan_keeps_its_margin(tmp_path):
    clock = Clock()
    b, ctx, said = _budget(tmp_path, clock, margin_fraction=0.02, min_final_images=5)
    from chexfound.ssl.budget import FinalSet

    b.plan = ProbePlan(0, 0, 0, finals=[FinalSet("kermany", 40, 40, 1)], random_seeds=2)
    clock.t = 100.0  # 10 s left, 1.1 s of it the margin
    plan = b.final_plan(lambda p: sum(f.n_train + f.n_test for f in p.finals) * (1 + p.random_seeds) * 0.05, 0.0)
    assert (plan.finals[0].n_train, plan.random_seeds) == (20, 2) and "turned down" in said[-1]
    assert b.final_fits(8.0, 0.0) and not b.final_fits(9.0, 0.0)


# -- run state -----------------------------------------------------------------------------------------------
def test_run_state_reads_both_checkpoint_forms():
    plan = ProbePlan(3, 10, 10)
    costs = {"feature_s": 0.1, "fit_s": 0.0, "decode_s": 0.0, "feature_dim": 8, "pixel_dim": 1024, "ckpt_s": 1.0,
             "end_s": 2.0}
    form1 = {"total_iterations": 50, "epoch_length": 5.0, "elapsed_s": 12.0, "monitor": {"counts": {"uniform": 2}},
             "heal": {"lr_scale": 0.5, "rollbacks": []},
             "budget": {"plan": plan.to_dict(), "costs": costs, "end_reserve_s": 30.0, "step_s": 0.5,
                        "budget_s": 600.0, "planned_total": 48, "replanned_total": 50}}
    rs = RunState.from_dict(form1)
    assert (rs.total_iterations, rs.elapsed_s, rs.heal["lr_scale"]) == (50, 12.0, 0.5)
    assert rs.heal["collapse"] == {"counts": {"uniform": 2}}  # the separate monitor became the heal signal's
    assert rs.budget.costs.ckpt_s == 1.0 and rs.budget.replanned_total == 50 and rs.plan == plan
    form2 = rs.to_dict()
    assert form2["version"] == 2 and "monitor" not in form2 and RunState.from_dict(form2) == rs
    # a run without a budget: an empty budget dict, the plan re-read from the config
    plain = RunState.from_dict({"total_iterations": 6, "epoch_length": 3.0, "budget": {}})
    assert plain.budget is None and plain.plan is None and RunState.from_dict(plain.to_dict()) == plain
