"""Runs that heal themselves: the divergence signals, the gentler settings, and faults injected into tiny CPU
runs (detected, rolled back, recovered; the give-up path; the settings surviving a resume)."""

from __future__ import annotations

import json
import math

import pytest

from chexfound.ssl.heal import DivergenceDetector, HealConfig, adjust_schedules

LN_K = math.log(64)


def _row(gn=1.0, ent=0.9 * LN_K, dino=None, loss=5.0, **kw):
    dino = 0.8 * LN_K if dino is None else dino
    return {"loss": loss, "grad_norm": gn, "teacher_entropy": ent, "log_n_prototypes": LN_K,
            "dino_local_loss": dino * 0.75, "dino_global_loss": dino * 0.25, **kw}


def test_grad_norm_blowup_against_its_running_median():
    d = DivergenceDetector(HealConfig(min_history=3, patience=2, grad_norm_factor=10))
    for i, g in enumerate([1.0, 1.2, 0.9, 1.1], start=1):
        assert d.observe(i, _row(gn=g)) is None
    assert d.observe(5, _row(gn=50.0)) is None  # one row is not enough ...
    assert d.observe(6, _row(gn=1.0)) is None  # ... and a recovered row resets the count
    assert d.observe(7, _row(gn=80.0)) is None
    div = d.observe(8, _row(gn=300.0))
    assert div.reason == "grad_blowup" and div.iteration == 8 and div.onset == 6  # the step of row 7
    assert "300 vs a running median of 1 " in div.detail  # of 1.0, 1.2, 0.9, 1.1, 1.0
    # flagged rows never enter the median
    assert max(g for _, g in d.history) < 2


def test_uniform_teacher_and_frozen_loss_only_after_being_alive():
    d = DivergenceDetector(HealConfig(patience=2))
    # uniform from the start (identical CLS tokens at init): not a divergence
    for i in range(1, 6):
        assert d.observe(i, _row(ent=LN_K, dino=LN_K + 0.5)) is None
    d = DivergenceDetector(HealConfig(patience=2))
    d.observe(1, _row(ent=0.9 * LN_K))
    assert d.observe(2, _row(ent=LN_K - 0.0005)) is None
    div = d.observe(3, _row(ent=LN_K - 0.0001))
    assert div.reason == "uniform_teacher" and div.onset == 1
    d = DivergenceDetector(HealConfig(patience=2))
    d.observe(1, _row(ent=LN_K, dino=LN_K + 1.0))
    d.observe(2, _row(ent=LN_K, dino=LN_K + 0.0005))
    div = d.observe(3, _row(ent=LN_K, dino=LN_K))
    assert div.reason == "frozen_loss" and "froze at ln K" in div.detail


def test_non_finite_is_acted_on_at_once():
    d = DivergenceDetector(HealConfig())
    div = d.observe(10, _row(loss=float("nan")))
    assert div.reason == "nonfinite" and div.onset == 9
    # a trainer that skips non-finite steps on the device reports them in its stats
    div = DivergenceDetector(HealConfig()).observe(20, _row(nonfinite=2.0, first_nonfinite_iteration=17.0))
    assert div.onset == 17 and "iteration 17" in div.detail


def test_adjusted_schedules_scale_lr_and_the_ema_gap(tiny_config):
    from chexfound.ssl.schedules import build_schedules

    s = build_schedules(tiny_config(), 1e-3, 100, 10)
    a = adjust_schedules(s, 0.25, 0.5)
    for it in (0, 3, 10, 50, 99, 120):
        assert a.lr(it) == pytest.approx(0.25 * s.lr(it))
        assert a.last_layer_lr(it) == pytest.approx(0.25 * s.last_layer_lr(it))
        assert 1 - a.momentum(it) == pytest.approx(0.5 * (1 - s.momentum(it)))
        assert a.wd(it) == s.wd(it) and a.teacher_temp(it) == s.teacher_temp(it)


# -- faults injected into tiny runs ----------------------------------------------------------------------
def _cfg(tiny_config, tiny_corpus, *extra):
    cfg = tiny_config("optim.epochs=4", "train.epoch_length=4", "heal.min_history=3", "heal.snapshot_every=4",
                      *extra)
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    return cfg


def _rows(out, kind=None):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


@pytest.fixture
def lr_spike(monkeypatch):
    """lr x 1e12 at iterations 8 and 9, the first time they run (a transient fault): the weights blow up and
    the next loss is non-finite."""
    from chexfound.ssl.trainer import Trainer

    seen: set[int] = set()
    step = Trainer.train_step

    def train_step(self, it, images, lr_scale=1.0):
        first = it not in seen
        seen.add(it)
        return step(self, it, images, lr_scale * (1e12 if first and it in (8, 9) else 1.0))

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.fixture
def loss_spike(monkeypatch):
    """Gradients x 1e4: at iterations 8 and 9 the first time they run (`once`, a transient fault), or from
    iteration 8 on, every time (a lasting one)."""
    from chexfound.ssl.meta_arch import SSLMetaArch

    real = SSLMetaArch.forward_losses
    mode = {"once": True, "seen": set(), "it": 0}

    def forward_losses(self, *a, **kw):
        loss, stats = real(self, *a, **kw)
        it = mode["it"]
        first = it not in mode["seen"]
        mode["seen"].add(it)
        spike = (it in (8, 9) and first) if mode["once"] else it >= 8
        return (loss * 1e4 if spike else loss), stats

    from chexfound.ssl.trainer import Trainer

    step = Trainer.train_step

    def train_step(self, it, images, lr_scale=1.0):
        mode["it"] = it
        return step(self, it, images, lr_scale)

    monkeypatch.setattr(SSLMetaArch, "forward_losses", forward_losses)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    return mode


def test_lr_spike_is_detected_rolled_back_and_recovered(tmp_path, tiny_corpus, tiny_config, lr_spike):
    from chexfound.ssl.checkpoint import latest_checkpoint, load_checkpoint
    from chexfound.ssl.train import pretrain

    said: list[str] = []
    res = pretrain(_cfg(tiny_config, tiny_corpus), tmp_path, device="cpu", quiet=True, echo=said.append)
    assert res.iterations == 16
    (rb,) = _rows(tmp_path, "rollback")
    assert rb["reason"] == "nonfinite" and rb["rolled_back_to"] == 8 and rb["source"] == "memory snapshot"
    assert rb["lr_scale"] == 0.5 and any(s.startswith("ROLLBACK 1/3") for s in said)
    train = _rows(tmp_path, "train")
    assert [r["iteration"] for r in train] == list(range(1, 17))  # one clean curve
    assert all(math.isfinite(r["loss"]) for r in train)
    # The step skips a non-finite update on the device and the loop reads it at the next log row (10): rows 9
    # (lr spiked) and 10 (its non-finite loss) are the abandoned stretch.
    assert [r["iteration"] for r in _rows(tmp_path, "train_abandoned")] == [9, 10]
    assert not math.isfinite(_rows(tmp_path, "train_abandoned")[-1]["loss"] or math.nan)
    by_it = {r["iteration"]: r for r in _rows(tmp_path, "train_abandoned")}
    assert train[8]["lr"] == pytest.approx(0.5 * by_it[9]["lr"])  # the same iteration, half the lr
    heal = load_checkpoint(latest_checkpoint(tmp_path))["state"]["heal"]
    assert heal["lr_scale"] == 0.5 and heal["rollbacks"][0]["reason"] == "nonfinite"
    from chexfound.runio import read_jsonl
    from chexfound.ssl.diagnostics import rollback_marks

    assert (tmp_path / "report.png").is_file()
    assert rollback_marks(read_jsonl(tmp_path / "metrics.jsonl")) == [(10, 8, "nonfinite")]  # drawn in the report


def test_gradient_blowup_rolls_back_to_the_snapshot_before_it(tmp_path, tiny_corpus, tiny_config, loss_spike):
    from chexfound.ssl.train import pretrain

    pretrain(_cfg(tiny_config, tiny_corpus), tmp_path, device="cpu", quiet=True, echo=lambda s: None)
    (rb,) = _rows(tmp_path, "rollback")
    assert rb["reason"] == "grad_blowup" and rb["detected_at"] == 10 and rb["onset"] == 8
    assert rb["rolled_back_to"] == 8
    train = _rows(tmp_path, "train")
    assert max(r["grad_norm"] for r in train[8:]) < 1e3 * min(r["grad_norm"] for r in train[:8])


def test_a_lasting_fault_gives_up_with_a_clear_message(tmp_path, tiny_corpus, tiny_config, loss_spike):
    from chexfound.ssl.heal import DivergedError
    from chexfound.ssl.train import pretrain

    loss_spike["once"] = False
    cfg = _cfg(tiny_config, tiny_corpus, "heal.max_rollbacks=2", "checkpoint.every=6")
    with pytest.raises(DivergedError, match=r"gradient norm blew up at iteration 10.*2 rollback\(s\).*"
                                            r"gave up \(heal.max_rollbacks=2\).*ckpt_00000006.pt"):
        pretrain(cfg, tmp_path, device="cpu", quiet=True, echo=lambda s: None)
    rbs = _rows(tmp_path, "rollback")
    assert len(rbs) == 2 and [r["lr_scale"] for r in rbs] == [0.5, 0.25]
    # the second went further back than the first (the first's state diverged again at once)
    assert rbs[1]["rolled_back_to"] < rbs[0]["rolled_back_to"]
    assert _rows(tmp_path, "gave_up")


def test_rollback_settings_survive_a_resume(tmp_path, tiny_corpus, tiny_config, lr_spike):
    from chexfound.ssl.schedules import build_schedules
    from chexfound.ssl.train import pretrain

    cfg = _cfg(tiny_config, tiny_corpus)
    first = pretrain(cfg, tmp_path, device="cpu", quiet=True, stop_after=12, echo=lambda s: None)
    assert first.stopped_early and _rows(tmp_path, "rollback")
    pretrain(cfg, tmp_path, device="cpu", quiet=True, echo=lambda s: None)
    train = {r["iteration"]: r for r in _rows(tmp_path, "train")}
    from chexfound.ssl.trainer import Trainer  # noqa: F401  (the base lr of the tiny recipe)
    from chexfound.ssl.schedules import scaled_lr

    lr = scaled_lr(float(cfg["optim"]["base_lr"]), 6, cfg["optim"]["scaling_rule"])
    sched = build_schedules(cfg, lr, 16, 4)
    for it in (13, 14, 15):  # after the resume
        assert train[it]["lr"] == pytest.approx(0.5 * sched.lr(it - 1))


def test_a_rollback_leaves_no_checkpoint_of_the_diverged_stretch(tmp_path, tiny_corpus, tiny_config, loss_spike,
                                                                 monkeypatch):
    """A checkpoint written between the onset and the detection holds the damage (and the settings before the
    rollback): a resume right after the rollback must not continue from it, nor is it the last good one."""
    from chexfound.ssl.checkpoint import list_checkpoints
    from chexfound.ssl.train import pretrain
    from chexfound.ssl.heal import HealPolicy

    seen = []
    real = HealPolicy.roll_back

    def roll_back(self, div):
        target = real(self, div)
        seen.append((target, [it for it, _ in list_checkpoints(tmp_path)], self.last_good))
        return target

    monkeypatch.setattr(HealPolicy, "roll_back", roll_back)
    # the spike at iteration 8 is detected at the log row of 10; ckpt_00000009 is written in between
    pretrain(_cfg(tiny_config, tiny_corpus, "checkpoint.every=9"), tmp_path, device="cpu", quiet=True,
             echo=lambda s: None)
    ((target, on_disk, last_good),) = seen
    assert target == 8 and on_disk == [] and last_good is None


def test_a_memory_snapshot_is_not_changed_by_the_training_after_its_rollback(tmp_path, tiny_corpus, tiny_config,
                                                                            loss_spike, monkeypatch):
    """On the CPU, loading a snapshot's optimizer state adopts its tensors: the steps after the rollback must not
    rewrite the snapshot (a later rollback may go back to it)."""
    import torch

    from chexfound.ssl.heal import cpu_copy
    from chexfound.ssl.train import pretrain
    from chexfound.ssl.heal import HealPolicy

    seen = []
    real = HealPolicy.roll_back

    def roll_back(self, div):
        target = real(self, div)
        snap = self.snapshot_at(target)
        seen.append((snap, cpu_copy(snap.payload["optimizer"]["state"])))
        return target

    monkeypatch.setattr(HealPolicy, "roll_back", roll_back)
    pretrain(_cfg(tiny_config, tiny_corpus), tmp_path, device="cpu", quiet=True, echo=lambda s: None)
    ((snap, at_rollback),) = seen
    now = snap.payload["optimizer"]["state"]
    assert at_rollback and all(torch.equal(now[i][k], v) for i, st in at_rollback.items() for k, v in st.items())


def test_with_healing_off_a_divergence_is_logged_not_acted_on(tmp_path, tiny_corpus, tiny_config, loss_spike):
    from chexfound.ssl.train import pretrain

    said: list[str] = []
    res = pretrain(_cfg(tiny_config, tiny_corpus, "heal.enabled=false"), tmp_path, device="cpu", quiet=True,
                   echo=said.append)
    assert res.iterations == 16 and not _rows(tmp_path, "rollback")
    warns = [r for r in _rows(tmp_path, "warning") if "heal.enabled=false" in r["message"]]
    assert len(warns) == 1 and warns[0]["iteration"] == 10 and "gradient norm blew up" in warns[0]["message"]
    assert any("not acted on" in s for s in said)
