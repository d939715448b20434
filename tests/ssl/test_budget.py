"""Time budgets: the cost model, the turn-down order, step calibration, and whole runs on a fake clock (every
measured duration is scripted, so the assertions do not depend on how busy the machine is)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chexfound.ssl.budget import (Deadline, FinalSet, ProbeCosts, ProbePlan, calibrate_step, fit_budget,
                                  turn_down)

BCFG = {"max_probe_fraction": 0.3, "margin_fraction": 0.02, "min_final_images": 200, "tolerance_fraction": 0.05}


def _plan() -> ProbePlan:
    return ProbePlan(periodic=7, periodic_train=1000, periodic_test=624,
                     finals=[FinalSet("kermany", 2000, 624, 1), FinalSet("nih14", 380, 165, 13)], random_seeds=3)


def _costs() -> ProbeCosts:
    return ProbeCosts(feature_s=0.01, fit_s=1e-6, feature_dim=768, ckpt_s=2.0, end_s=5.0, decode_s=0.0)


def test_cost_model_adds_up_the_parts():
    c, p = _costs(), _plan()
    periodic = 0.01 * 1624 + 1e-6 * 1000 * 768
    assert c.periodic_probe_s(p) == pytest.approx(periodic)
    kermany_model = 0.01 * 2624 + 1e-6 * 2000 * 768
    nih_model = 0.01 * 545 + 1e-6 * 380 * 768 * 13
    pixels = 1e-6 * 1024 * (2000 + 380 * 13)
    assert c.final_probes_s(p) == pytest.approx(5 * (kermany_model + nih_model) + pixels)
    # a pixel baseline already fitted on the same set is not counted again
    done = {"kermany": (2000, 624)}
    assert c.final_probes_s(p, done) == pytest.approx(5 * (kermany_model + nih_model) + 1e-6 * 1024 * 380 * 13)
    assert c.reserve_s(p) == pytest.approx(7 * periodic + c.final_probes_s(p) + 5.0)
    # decoding: each set once, when it is not decoded yet
    c.decode_s = 0.002
    assert c.periodic_s(p) == pytest.approx(7 * periodic + 0.002 * 1624)
    assert c.periodic_s(p, {"periodic:1000+624"}) == pytest.approx(7 * periodic)
    extra = c.final_probes_s(p) - c.final_probes_s(p, decoded={"kermany:2000+624", "nih14:380+165"})
    assert extra == pytest.approx(0.002 * (2624 + 545))


def test_turn_down_goes_periodic_then_sets_then_seeds():
    c, p = _costs(), _plan()
    full = c.reserve_s(p)
    # a little too much: only periodic probes go
    q = turn_down(p, c.reserve_s, full - 1.0, 200)
    assert q.periodic == 3 and [f.n_train for f in q.finals] == [2000, 380]
    assert q.turned_down == ["periodic probes 7 -> 3"]
    # much too much: every periodic probe, then the final sets down to the floor, then the seeds ...
    q = turn_down(p, c.reserve_s, 1.0, 200, stages=("periodic", "final_sets", "random_seeds"))
    assert q.periodic == 0 and q.random_seeds == 1
    assert [(f.n_train, f.n_test) for f in q.finals] == [(200, 200), (200, 165)]  # 165 < 200: kept
    assert q.turned_down == ["periodic probes 7 -> 0", "final kermany set 2000+624 -> 200+200 images (train+test)",
                             "final nih14 set 380+165 -> 200+165 images (train+test)", "random-init baselines 3 -> 1"]
    # ... and last the final tasks, NIH-14 first
    q = turn_down(p, c.reserve_s, 1.0, 200)
    assert q.finals == [] and q.turned_down[-2:] == ["final nih14 comparison dropped",
                                                     "final kermany comparison dropped"]
    q = turn_down(p, c.reserve_s, c.reserve_s(q) + 20.0, 200)
    assert [f.task for f in q.finals] == ["kermany"]
    # the plan it was given is left alone
    assert p.periodic == 7 and p.finals[0].n_train == 2000


def test_fit_keeps_most_of_the_budget_for_training():
    c, p = _costs(), _plan()
    fit = fit_budget(600.0, elapsed_s=40.0, step_s=0.5, done=4, costs=c, plan=p, bcfg=BCFG, epochs=100,
                     ckpt_every=0)
    assert fit.reserve_s <= 0.3 * 600 and not fit.over_cap
    assert fit.reserve_s == pytest.approx(c.reserve_s(fit.plan))
    train_s = 600 - 40 - fit.reserve_s - 0.02 * 600
    assert fit.total == 4 + round(train_s / 0.5)  # the end nearest the budget
    assert fit.epoch_length == pytest.approx(fit.total / 100)
    assert "periodic probes" in fit.message() and fit.row()["kind"] == "budget"
    # checkpoints during the run are paid from the training time
    with_ckpt = fit_budget(600.0, 40.0, 0.5, 4, c, p, BCFG, 100, ckpt_every=10)
    assert with_ckpt.total == 4 + round(train_s / (0.5 + 2.0 / 10))
    # a small budget drops every probe, and still trains
    small = fit_budget(30.0, 20.0, 0.5, 4, c, p, BCFG, 100, 0)
    assert small.plan.finals == [] and small.plan.periodic == 0 and not small.over_cap
    assert small.total == 4 + round((30 - 20 - 5.0 - 0.6) / 0.5)
    # 8.4 s left for a longer step: one more iteration ends nearer the budget, unless it would end more than
    # the tolerance (5% = 1.5 s) past it
    free = ProbeCosts(end_s=1.0)
    assert fit_budget(30.0, 20.0, 9.5, 4, free, ProbePlan(0, 0, 0), BCFG, 100, 0).total == 5
    assert fit_budget(30.0, 20.0, 10.0, 4, free, ProbePlan(0, 0, 0), BCFG, 100, 0).total == 4
    # one too small even for the exports says so
    c.end_s = 20.0
    tiny = fit_budget(30.0, 20.0, 0.5, 4, c, p, BCFG, 100, 0)
    assert tiny.over_cap and tiny.total == 4 and "too small" in tiny.message()
    # setup that spent the whole budget: no training beyond the calibration iterations, and it says so
    late = fit_budget(30.0, 31.0, 0.5, 2, c, p, BCFG, 100, 0)
    assert late.total == 2 and "setup spent the budget" in late.message()


def test_calibration_excludes_the_first_step_and_stays_cheap():
    t = [0.0]
    durations = iter([30.0, 1.0, 1.4, 0.9, 5.0])  # the first step pays the warm-up

    def step(k: int) -> None:
        t[0] += next(durations)

    step_s, done = calibrate_step(step, lambda: None, budget_s=600.0, clock=lambda: t[0])
    assert (step_s, done) == (1.0, 4)
    # slow steps on a small budget: a single timed step
    durations = iter([30.0, 10.0, 10.0])
    step_s, done = calibrate_step(step, lambda: None, budget_s=100.0, clock=lambda: t[0])
    assert (step_s, done) == (10.0, 2)
    # on a CPU without compilation a long first step is its own estimate: no second slow step
    durations = iter([30.0])
    assert calibrate_step(step, lambda: None, budget_s=100.0, clock=lambda: t[0], warmup_free=True) == (30.0, 1)
    durations = iter([1.0, 1.0, 1.0, 1.0])  # ... and a short one is still followed by timed ones
    assert calibrate_step(step, lambda: None, budget_s=100.0, clock=lambda: t[0], warmup_free=True) == (1.0, 3)


def test_calibration_stops_where_rank_0_stops():
    """The timed steps are collectives: a rank whose own clock says stop must go on while rank 0 does (and
    stop when it stops), or one rank waits forever in a step the others never run."""
    t = [0.0]
    durations = iter([30.0, 10.0, 10.0, 10.0])  # this rank alone would stop after one timed step ...

    def step(k: int) -> None:
        t[0] += next(durations)

    rank0 = iter([False, False, False, True])  # ... rank 0 (faster) times three
    assert calibrate_step(step, lambda: None, budget_s=100.0, clock=lambda: t[0], warmup_free=True,
                          agree=lambda flag: next(rank0)) == (10.0, 4)
    durations = iter([1.0, 1.0])  # ... and the other way round: rank 0 stops at its first timed step
    rank0 = iter([False, True])
    assert calibrate_step(step, lambda: None, budget_s=100.0, clock=lambda: t[0], agree=lambda flag: next(rank0)) == (1.0, 2)


def test_deadline():
    t = [100.0]
    d = Deadline(t_start=100.0, budget_s=50.0, end_reserve_s=10.0, step_s=1.0, clock=lambda: t[0])
    assert d.left_s() == 50.0 and d.training_left_s() == 40.0 and not d.behind()
    assert d.fits(probe_s=5.0, iterations_left=35) and not d.fits(probe_s=5.0, iterations_left=36)
    t[0] = 139.0  # 1 s of training left: a 3 s step would overshoot by more than stopping now falls short
    assert d.behind(next_step_s=3.0) and not d.behind(next_step_s=1.0) and not d.behind()
    d.tolerance_s = 0.5  # ... and a 1.8 s step would end more than the tolerance past the deadline
    assert d.behind(next_step_s=1.8) and not d.behind(next_step_s=1.4)
    d.tolerance_s = float("inf")
    t[0] = 141.0
    assert d.behind()


# -- whole runs on a fake clock ---------------------------------------------------------------------------
STEP_S, FEATURE_S, FIT_S = 2.0, 0.05, 1e-5


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def fake_costs(monkeypatch):
    """Scripted durations: a training step, a probe image through a backbone, a logistic fit unit."""
    import chexfound.ssl.probe as probe
    import chexfound.ssl.probe_runner as runner
    from chexfound.ssl.trainer import Trainer

    clock = FakeClock()
    step = Trainer.train_step
    slow = {"after": None, "factor": 1.0}

    def train_step(self, it, images, lr_scale=1.0):
        out = step(self, it, images, lr_scale)
        late = slow["after"] is not None and it >= slow["after"]
        clock.t += STEP_S * (slow["factor"] if late else 1.0)
        return out

    feats = runner.backbone_features

    def backbone_features(model, images, *a, **kw):
        clock.t += FEATURE_S * len(images)
        return feats(model, images, *a, **kw)

    def linear_probe_scores(ftr, ytr, fte, *a, **kw):
        # these tests are about time: a class-mean direction stands in for the (slow) logistic fit
        clock.t += FIT_S * ftr.shape[0] * ftr.shape[1] * ytr.shape[1]
        out = np.zeros((fte.shape[0], ytr.shape[1]))
        for c in range(ytr.shape[1]):
            pos, neg = ytr[:, c] == 1, ytr[:, c] == 0
            if pos.any() and neg.any():
                out[:, c] = fte @ (ftr[pos].mean(0) - ftr[neg].mean(0))
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(runner, "backbone_features", backbone_features)
    monkeypatch.setattr(runner, "linear_probe_scores", linear_probe_scores)
    monkeypatch.setattr(probe, "linear_probe_scores", linear_probe_scores)
    return clock, slow


def _budget_config(tiny_config, tiny_corpus, data_root, budget: float, *extra: str) -> dict:
    cfg = tiny_config(f"probe.kermany={data_root / 'kermany'}", "probe.n_train=40", "probe.n_test=40",
                      "probe.n_evals=3", "probe.final_n_train=60", "probe.final_n_test=60",
                      "probe.final_random_seeds=3", "probe.batch_size=16", f"train.time_budget_s={budget}",
                      "budget.min_final_images=20", "train.log_every=5", *extra)
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    return cfg


def _rows(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_budgeted_run_ends_inside_its_budget_and_trains_most_of_it(tmp_path, tiny_corpus, tiny_config, data_root,
                                                                   fake_costs):
    clock, _ = fake_costs
    cfg = _budget_config(tiny_config, tiny_corpus, data_root, 200.0)
    from chexfound.ssl.train import pretrain

    res = pretrain(cfg, tmp_path, device="cpu", quiet=True, clock=clock, echo=lambda s: None)
    plan = _rows(tmp_path, "budget")[0]
    assert plan["event"] == "plan" and plan["turned_down"] == []
    assert plan["costs"]["feature_s"] == pytest.approx(FEATURE_S) and plan["step_s"] == pytest.approx(STEP_S)
    end = _rows(tmp_path, "budget")[-1]
    assert end["event"] == "end" and 0.95 <= end["budget_used"] <= 1.0
    assert end["training_fraction"] >= 0.5 and end["iterations"] == plan["total"] == res.iterations
    # the step-0 probe and three periodic ones; the final comparison with every configured baseline
    assert [r["iteration"] for r in _rows(tmp_path, "probe")][0] == 0 and len(_rows(tmp_path, "probe")) == 4
    comp = json.loads((tmp_path / "probe_comparison.json").read_text())["kermany"]
    assert comp["n_train"] == 60 and len([k for k in comp["models"] if k.startswith("random")]) == 3
    # the calibration iterations are the run's first (at learning rate 0), and logged
    train = _rows(tmp_path, "train")
    assert train[0]["iteration"] == 1 and train[0]["lr"] == 0.0


def test_a_small_budget_turns_probes_down_and_says_so(tmp_path, tiny_corpus, tiny_config, data_root, fake_costs):
    clock, _ = fake_costs
    cfg = _budget_config(tiny_config, tiny_corpus, data_root, 60.0)
    from chexfound.ssl.train import pretrain

    said: list[str] = []
    pretrain(cfg, tmp_path, device="cpu", quiet=True, clock=clock, echo=said.append)
    plan = _rows(tmp_path, "budget")[0]
    assert plan["turned_down"] == ["periodic probes 4 -> 0", "final kermany set 60+60 -> 30+30 images (train+test)"]
    assert any("probes turned down to fit" in s for s in said)
    assert "probes turned down to fit" in (tmp_path / "pretrain.log").read_text()
    assert not _rows(tmp_path, "probe")  # not even the step-0 probe
    comp = json.loads((tmp_path / "probe_comparison.json").read_text())["kermany"]
    assert (comp["n_train"], comp["n_test"]) == (30, 30)
    end = _rows(tmp_path, "budget")[-1]
    assert 0.95 <= end["budget_used"] <= 1.0 and end["training_fraction"] >= 0.5


def test_a_run_that_falls_behind_is_cut_and_still_ends_in_time(tmp_path, tiny_corpus, tiny_config, data_root,
                                                               fake_costs):
    clock, slow = fake_costs
    slow.update(after=10, factor=2.0)  # steps get twice as slow after the calibration
    # re-planning off: the deadline is the safety net behind it (late slow-downs, long probes, rollbacks)
    cfg = _budget_config(tiny_config, tiny_corpus, data_root, 200.0, "probe.n_evals=0", "budget.replan_until=0")
    from chexfound.ssl.checkpoint import load_checkpoint, latest_checkpoint
    from chexfound.ssl.train import pretrain

    res = pretrain(cfg, tmp_path, device="cpu", quiet=True, clock=clock, echo=lambda s: None)
    plan = _rows(tmp_path, "budget")[0]
    cut = [r for r in _rows(tmp_path, "budget") if r["event"] == "cut_short"]
    assert cut and cut[0]["planned_iterations"] == plan["total"] > res.iterations
    end = _rows(tmp_path, "budget")[-1]
    assert 0.95 <= end["budget_used"] <= 1.05
    # the last checkpoint says the run is over: a rerun does not train on
    st = load_checkpoint(latest_checkpoint(tmp_path))["state"]
    assert st["total_iterations"] == res.iterations


def test_a_budget_too_small_for_any_probe_trains_instead(tmp_path, tiny_corpus, tiny_config, data_root, fake_costs,
                                                          monkeypatch):
    import sys

    clock, _ = fake_costs
    monkeypatch.setattr(sys.modules[__name__], "FEATURE_S", 5.0)  # features far too slow for this budget
    cfg = _budget_config(tiny_config, tiny_corpus, data_root, 200.0)
    from chexfound.ssl.train import pretrain

    pretrain(cfg, tmp_path, device="cpu", quiet=True, clock=clock, echo=lambda s: None)
    plan = _rows(tmp_path, "budget")[0]
    assert plan["turned_down"][-1] == "final kermany comparison dropped"
    assert plan["costs"]["fit_s"] == 0.0  # no fit was timed: no probe could have used it
    assert not (tmp_path / "probe_comparison.json").exists() and not _rows(tmp_path, "final_probe")
    end = _rows(tmp_path, "budget")[-1]
    assert 0.95 <= end["budget_used"] <= 1.0 and end["training_fraction"] >= 0.5


@pytest.mark.parametrize("factor", [0.5, 1.6])
def test_a_run_whose_pace_differs_from_its_calibration_is_replanned_and_fills_its_budget(
        tmp_path, tiny_corpus, tiny_config, data_root, fake_costs, factor):
    """A CPU's first step is often slower than the rest, and other jobs come and go: the plan follows the
    measured pace (faster: more iterations, slower: fewer) instead of ending far early or being cut short,
    and the schedules keep their shape over the new length."""
    clock, slow = fake_costs
    slow.update(after=3, factor=factor)  # every step after the calibration's (iterations 0-2)
    cfg = _budget_config(tiny_config, tiny_corpus, data_root, 200.0)
    from chexfound.ssl.checkpoint import load_checkpoint, latest_checkpoint
    from chexfound.ssl.train import pretrain

    # with the progress bar up: the re-plan's line goes through the bar and into pretrain.log
    res = pretrain(cfg, tmp_path, device="cpu", quiet=False, clock=clock, echo=lambda s: None)
    assert "budget: re-planned at iteration" in (tmp_path / "pretrain.log").read_text()
    rows = _rows(tmp_path, "budget")
    plan, end = rows[0], rows[-1]
    replans = [r for r in rows if r["event"] == "replan"]
    assert replans and not [r for r in rows if r["event"] == "cut_short"]
    assert replans[0]["planned_iterations"] == plan["total"]
    assert (res.iterations > plan["total"]) if factor < 1 else (res.iterations < plan["total"])
    assert res.iterations == replans[-1]["total"] == end["iterations"]
    assert 0.95 <= end["budget_used"] <= 1.0 and end["training_fraction"] >= 0.5
    # the step-0 probe and all three periodic ones ran, after the re-plan inside the new length
    probes = [r["iteration"] for r in _rows(tmp_path, "probe")]
    assert len(probes) == 4 and probes[-1] < res.iterations
    # the cosine ends where the run ends: the last step's lr is (close to) the schedule's final value
    train = _rows(tmp_path, "train")
    assert train[-1]["iteration"] == res.iterations
    assert train[-1]["lr"] <= 0.02 * max(r["lr"] for r in train) + cfg["optim"]["min_lr"]
    st = load_checkpoint(latest_checkpoint(tmp_path))["state"]
    assert st["total_iterations"] == res.iterations


def test_replan_total_moves_only_beyond_the_threshold():
    from chexfound.ssl.budget import replan_total

    assert replan_total(done=20, total=100, pace_s=1.0, training_left_s=82.0, tolerance_s=1.0, min_change=0.05) is None
    assert replan_total(done=20, total=100, pace_s=0.5, training_left_s=80.0, tolerance_s=1.0, min_change=0.05) == 180
    assert replan_total(done=20, total=100, pace_s=2.0, training_left_s=80.0, tolerance_s=1.0, min_change=0.05) == 60
    # no time left: one more iteration at most (the deadline, not the plan, stops a run that is behind)
    assert replan_total(done=20, total=100, pace_s=2.0, training_left_s=-5.0, tolerance_s=1.0, min_change=0.05) == 21
