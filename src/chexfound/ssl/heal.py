"""Runs that heal themselves: divergence seen while it happens, a rollback to the last good state, a gentler
recipe, and a clear stop after `heal.max_rollbacks` tries.

The detector reads only what a log step already reads (the all-reduced stats of that step), so it adds no
host sync. Its signals:

  nonfinite        a non-finite loss or gradient since the last log step (acted on at once)
  grad_blowup      the pre-clip gradient norm above `grad_norm_factor` x the running median of the last
                   `grad_norm_window` good log rows (after `min_history` of them)
  uniform_teacher  the teacher's targets pinned at ln K (entropy within `uniform_tol` nats of it) after they had
                   been below `alive_below` x ln K: Sinkhorn-Knopp targets that climbed back to uniform
  frozen_loss      the DINO loss (local + global terms, which add up to exactly ln K when teacher and student
                   are both uniform) within `uniform_tol` nats of ln K after it had been away from it: the
                   dead fixed point with zero gradient that nothing brings back
The last three must hold for `patience` consecutive log rows. A fifth signal only warns (a rollback does not
cure it, the recipe must change): `collapse`, targets near-uniform (above 0.97 ln K) or the batch sent to one
or two prototypes, persisting past the first 15% of the run (`CollapseSignal`).

`HealPolicy` is what the training loop asks after every step: it owns the detector, the snapshots, the
rollback decision and the restoring, the give-up, and the state saved in checkpoints.

A rollback restores the newest good state older than the first flagged row: an in-memory CPU snapshot
(taken every `snapshot_every` iterations at a clean log step; the start state is always one) or a disk
checkpoint, whichever is newer. The learning rate is then multiplied by `lr_factor` and the teacher's EMA gap
(1 - momentum) by `ema_factor` for the rest of the run (both compound over rollbacks), and the run continues.
Each rollback is a `kind: rollback` row in metrics.jsonl; the rows of the abandoned stretch are relabelled
`train_abandoned` / `probe_abandoned` (kept for the report, left out of the curves' main lines); the disk
checkpoints written between the first flagged step and the detection are deleted (a resume must not continue
the damage). The settings are stored in every checkpoint, so a resumed run keeps them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch

from chexfound.errors import ChexfoundError
from chexfound.ssl.schedules import CosineSchedule, Schedules
from chexfound.ssl.trainer import NonFiniteLossError


class DivergedError(ChexfoundError):
    """The run kept diverging after `heal.max_rollbacks` rollbacks (or healing is off)."""


@dataclass(frozen=True)
class HealConfig:
    enabled: bool = True
    max_rollbacks: int = 3
    lr_factor: float = 0.5
    ema_factor: float = 1.0
    snapshot_every: int = 100
    snapshots_kept: int = 2
    grad_norm_factor: float = 10.0
    grad_norm_window: int = 20
    min_history: int = 5
    patience: int = 2
    uniform_tol: float = 0.002
    alive_below: float = 0.99

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> HealConfig:
        h = dict(cfg.get("heal") or {})
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: type(getattr(cls, k))(v) for k, v in h.items() if k in names})


@dataclass
class Divergence:
    reason: str  # nonfinite | grad_blowup | uniform_teacher | frozen_loss
    iteration: int  # the log step that confirmed it
    onset: int  # the first flagged iteration: the state rolled back to is older
    detail: str


# -- detection -------------------------------------------------------------------------------------
class CollapseSignal:
    """The detector's warning signal for the two DINO failure modes that a rollback does not cure (the recipe
    must change), judged after a grace period (`grace_fraction` of the run: early targets are near-uniform by
    construction) and after `patience` consecutive bad log rows, then said once each:
      uniform  targets flat over the K prototypes: teacher_entropy above `uniform_fraction` x ln K.
      one-hot  the batch sent to at most `onehot_max_prototypes` prototypes (with at least 8 rows per batch).
    The rollback signal `uniform_teacher` is the stricter level of the same reading (entropy within
    `uniform_tol` of ln K after having been well below it): targets that climbed back to uniform."""

    def __init__(self, n_rows: int = 0, grace_fraction: float = 0.15, patience: int = 3,
                 uniform_fraction: float = 0.97, onehot_max_prototypes: int = 2) -> None:
        self.n_rows, self.grace_fraction, self.patience = n_rows, grace_fraction, patience
        self.uniform_fraction, self.onehot_max = uniform_fraction, onehot_max_prototypes
        self.counts = {"uniform": 0, "one-hot": 0}
        self.warned: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "warned": sorted(self.warned)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.counts = {"uniform": 0, "one-hot": 0, **d.get("counts", {})}
        self.warned = set(d.get("warned", []))

    def check(self, it: int, stats: dict[str, float], total: int) -> str | None:
        """A warning the first time a collapse persists, else None."""
        if it < int(total * self.grace_fraction):
            return None
        log_k = stats["log_n_prototypes"]
        flags = {"uniform": stats["teacher_entropy"] > self.uniform_fraction * log_k,
                 "one-hot": self.n_rows >= 8 and stats["prototypes_in_use"] <= self.onehot_max}
        msg = None
        for kind, bad in flags.items():
            self.counts[kind] = self.counts[kind] + 1 if bad else 0
            if self.counts[kind] < self.patience or kind in self.warned:
                continue
            self.warned.add(kind)
            if kind == "uniform":
                msg = (f"collapse warning at iteration {it}: teacher targets are near-uniform "
                       f"(entropy {stats['teacher_entropy']:.2f} of ln K = {log_k:.2f}); the model distils "
                       "nothing. Try fewer prototypes (dino.head_n_prototypes), a lower teacher "
                       "temperature, or a faster teacher (teacher.momentum_teacher).")
            else:
                msg = (f"collapse warning at iteration {it}: the teacher sends the whole batch to "
                       f"{int(stats['prototypes_in_use'])} prototype(s) (entropy of the mean target "
                       f"{stats['teacher_mean_entropy']:.2f}). Use centering=sinkhorn_knopp, or a larger "
                       "center_momentum / lower lr.")
        return msg


class DivergenceDetector:
    SIGNALS = ("grad_blowup", "uniform_teacher", "frozen_loss")

    def __init__(self, hc: HealConfig, collapse: CollapseSignal | None = None) -> None:
        self.hc = hc
        self.collapse = collapse or CollapseSignal()
        self.history: deque[tuple[int, float]] = deque(maxlen=hc.grad_norm_window)  # (iteration, grad norm)
        self.counts = {s: 0 for s in self.SIGNALS}
        self.onsets = {s: -1 for s in self.SIGNALS}
        self.entropy_alive = False
        self.loss_alive = False

    @property
    def clean(self) -> bool:
        """No signal is building up (a snapshot taken now is a good state)."""
        return not any(self.counts.values())

    def median_grad_norm(self) -> float | None:
        if len(self.history) < self.hc.min_history:
            return None
        v = sorted(g for _, g in self.history)
        return v[len(v) // 2]

    def observe(self, iteration: int, stats: dict[str, float]) -> Divergence | None:
        """One log row's reduced stats -> a confirmed divergence, or None."""
        hc = self.hc
        n_bad = float(stats.get("nonfinite", 0.0))
        loss = float(stats.get("loss", 0.0))
        if n_bad > 0 or not math.isfinite(loss):
            first = int(float(stats.get("first_nonfinite_iteration", iteration - 1)))
            first = first if first >= 0 else iteration - 1
            parts = ", ".join(f"{k}={v:.4g}" for k, v in sorted(stats.items()) if k.endswith("loss"))
            return Divergence("nonfinite", iteration, first,
                              f"the loss became non-finite at iteration {first} ({parts})")
        log_k = float(stats["log_n_prototypes"])
        gn = float(stats.get("grad_norm", 0.0))
        ent = float(stats.get("teacher_entropy", 0.0))
        dino = float(stats.get("dino_local_loss", 0.0)) + float(stats.get("dino_global_loss", 0.0))
        med = self.median_grad_norm()
        flags = {
            "grad_blowup": med is not None and (not math.isfinite(gn) or gn > hc.grad_norm_factor * med),
            "uniform_teacher": self.entropy_alive and ent > log_k - hc.uniform_tol,
            "frozen_loss": self.loss_alive and abs(dino - log_k) < hc.uniform_tol,
        }
        found = None
        for s, bad in flags.items():
            if bad:
                if self.counts[s] == 0:
                    self.onsets[s] = iteration - 1  # the step that produced this row
                self.counts[s] += 1
                if self.counts[s] >= hc.patience and found is None:
                    found = Divergence(s, iteration, self.onsets[s], self._detail(s, iteration, gn, med, ent, dino, log_k))
            else:
                self.counts[s] = 0
        if not flags["grad_blowup"] and math.isfinite(gn):
            self.history.append((iteration, gn))
        self.entropy_alive |= ent < hc.alive_below * log_k
        self.loss_alive |= abs(dino - log_k) > 10 * hc.uniform_tol
        return found

    def _detail(self, s: str, it: int, gn: float, med: float | None, ent: float, dino: float, log_k: float) -> str:
        n = self.hc.patience
        if s == "grad_blowup":
            return (f"the gradient norm blew up at iteration {it}: {gn:.3g} vs a running median of {med:.3g} "
                    f"(> {self.hc.grad_norm_factor:g}x for {n} log rows)")
        if s == "uniform_teacher":
            return (f"the teacher's targets went uniform at iteration {it}: entropy {ent:.4f} of ln K = {log_k:.4f} "
                    f"for {n} log rows")
        return (f"the DINO loss froze at ln K at iteration {it}: {dino:.4f} vs {log_k:.4f} for {n} log rows "
                "(teacher and student uniform: zero gradient)")

    def rewind(self, iteration: int) -> None:
        """Forget what was seen after `iteration` (the state rolled back to)."""
        self.history = deque(((i, g) for i, g in self.history if i <= iteration), maxlen=self.hc.grad_norm_window)
        self.counts = {s: 0 for s in self.SIGNALS}
        self.onsets = {s: -1 for s in self.SIGNALS}

    def warn(self, iteration: int, stats: dict[str, float], total: int) -> str | None:
        """The collapse signal of one log row with finite stats (a warning, never a rollback): see
        `CollapseSignal`."""
        if not all(math.isfinite(v) for v in stats.values()):
            return None
        return self.collapse.check(iteration, stats, total)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(x) for x in self.history], "entropy_alive": self.entropy_alive,
                "loss_alive": self.loss_alive}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.history = deque(((int(i), float(g)) for i, g in d.get("history", [])), maxlen=self.hc.grad_norm_window)
        self.entropy_alive = bool(d.get("entropy_alive", False))
        self.loss_alive = bool(d.get("loss_alive", False))


# -- the settings a rollback changes ---------------------------------------------------------------------
def adjust_schedules(s: Schedules, lr_scale: float, ema_gap_scale: float) -> Schedules:
    """The same schedules with lr (and the last layer's) x `lr_scale` and 1 - momentum x `ema_gap_scale`.
    Cosine schedules are affine in their endpoints, so scaling the endpoints scales every value."""
    if lr_scale == 1.0 and ema_gap_scale == 1.0:
        return s

    def lr(c: CosineSchedule) -> CosineSchedule:
        return dataclasses.replace(c, base=c.base * lr_scale, final=c.final * lr_scale, start=c.start * lr_scale)

    def ema(c: CosineSchedule) -> CosineSchedule:
        def f(m: float) -> float:
            return 1.0 - (1.0 - m) * ema_gap_scale

        return dataclasses.replace(c, base=f(c.base), final=f(c.final), start=f(c.start))

    return dataclasses.replace(s, lr=lr(s.lr), last_layer_lr=lr(s.last_layer_lr), momentum=ema(s.momentum))


def cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU (an optimizer's state_dict holds live tensors)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)




@dataclass
class Snapshot:
    iteration: int  # the next iteration to run from this state
    payload: dict[str, Any]  # trainer.state() on the CPU
    loop: dict[str, Any]  # the detector's collapse signal at that point
    source: str = "memory"


@dataclass
class HealState:
    """What survives a resume: the settings rollbacks changed and their history."""

    lr_scale: float = 1.0
    ema_gap_scale: float = 1.0
    rollbacks: list[dict[str, Any]] = field(default_factory=list)


class HealPolicy:
    """The run's health: it reads every log step (`check`), warns of a collapse, keeps the snapshots, decides
    whether and where to roll back, restores that state into the trainer, and gives up after
    `heal.max_rollbacks`. `ctx` is the run's RunContext; `reapply` re-applies the schedules (the loop's
    `apply_schedules`, which asks `adjust` for what the rollbacks changed)."""

    def __init__(self, hc: HealConfig, ctx: Any, trainer: Any, n_rows: int = 0,
                 reapply: Callable[[], None] = lambda: None) -> None:
        from chexfound.ssl.checkpoint import latest_checkpoint

        self.hc, self.ctx, self.trainer, self.reapply = hc, ctx, trainer, reapply
        self.detector = DivergenceDetector(hc, CollapseSignal(n_rows))
        self.state = HealState()
        # FSDP holds a shard per rank: rollbacks there use the disk checkpoints only.
        self.in_memory = hc.enabled and hc.snapshots_kept > 0 and not trainer.sharded
        self.snapshots: deque[Snapshot] = deque(maxlen=max(1, hc.snapshots_kept))
        self.last_snapshot_it = -1
        self.first: Divergence | None = None
        self.last_good: Path | None = latest_checkpoint(ctx.out)
        self.unhealed: set[str] = set()  # signals seen with healing off (logged once each)
        self.total = 0  # the run's planned length (the collapse signal's grace period is a fraction of it)

    # -- what the loop asks --------------------------------------------------------------------------
    def adjust(self, s: Schedules, total: int) -> Schedules:
        """The schedules with what the rollbacks changed (lr and EMA gap)."""
        self.total = total
        return adjust_schedules(s, self.state.lr_scale, self.state.ema_gap_scale)

    def check(self, done: int, stats: dict[str, float] | None, div: Divergence | None = None) -> int | None:
        """After iteration `done`: `stats` the log step's reduced stats (None between log steps), `div` a
        divergence the step raised itself. The iteration to go on from after a rollback, else None."""
        if div is None and stats is not None:
            self.warn(done, stats)
            div = self.detector.observe(done, stats)
        target = self.roll_back(div) if div is not None else None
        if target is None and stats is not None:
            self.snapshot(done)
        return target

    def warn(self, done: int, stats: dict[str, float]) -> None:
        """The collapse signal: said and logged once per kind (a warning, the run goes on)."""
        msg = self.detector.warn(done, stats, self.total)
        if msg and self.ctx.info.is_main:
            self.ctx.say(f"WARNING: {msg}")
            self.ctx.metrics.write_row({"kind": "warning", "iteration": done, "message": msg})

    def snapshot(self, iteration: int) -> None:
        """A CPU copy of the trainer at a clean log step every `snapshot_every` iterations (and at the start)."""
        if not self.in_memory or not self.detector.clean:
            return
        if self.last_snapshot_it >= 0 and not (self.hc.snapshot_every
                                               and iteration - self.last_snapshot_it >= self.hc.snapshot_every):
            return
        loop = {"collapse": self.detector.collapse.state_dict()}
        self.snapshots.append(Snapshot(iteration, cpu_copy(self.trainer.state()), cpu_copy(loop)))
        self.last_snapshot_it = iteration

    def saved(self, path: Path | None) -> None:
        """A checkpoint was written (rank 0's path; None elsewhere)."""
        self.last_good = path or self.last_good

    # -- rollbacks -----------------------------------------------------------------------------------
    def pick(self, candidates: list[int], onset: int) -> int | None:
        """The state to roll back to, from the iterations of the good states on hand: the newest one before
        `onset` that no earlier rollback went back to (a state that diverged again right after a rollback may
        already hold the damage), else the newest before `onset`."""
        good = sorted(i for i in set(candidates) if i <= onset)
        used = {int(r["rolled_back_to"]) for r in self.state.rollbacks}
        fresh = [i for i in good if i not in used]
        return fresh[-1] if fresh else (good[-1] if good else None)

    def snapshot_at(self, iteration: int) -> Snapshot | None:
        return next((s for s in self.snapshots if s.iteration == iteration), None)

    def roll_back(self, div: Divergence) -> int | None:
        """Restore the newest good state before `div.onset` with gentler settings; the iteration to go on
        from, or None when the signal is not acted on (healing off, and not a non-finite loss)."""
        from chexfound.ssl.checkpoint import list_checkpoints, load_checkpoint
        from chexfound.ssl.run_state import RunState

        ctx, hc = self.ctx, self.hc
        if not hc.enabled and div.reason != "nonfinite":
            if div.reason not in self.unhealed:  # logged, once per signal
                self.unhealed.add(div.reason)
                msg = f"{div.detail}; not acted on (heal.enabled=false)"
                ctx.metrics.write_row({"kind": "warning", "iteration": div.iteration, "message": msg})
                ctx.say(f"WARNING: {msg}")
            return None
        disk = {it: p for it, p in list_checkpoints(ctx.out)}
        can = hc.enabled and len(self.state.rollbacks) < hc.max_rollbacks
        target = self.pick([s.iteration for s in self.snapshots] + list(disk), div.onset) if can else None
        if target is None:
            self._give_up(div)
        snap = self.snapshot_at(target)
        if snap is not None:  # memory first: same state, no disk read
            # a copy: on the CPU the optimizer would adopt the snapshot's tensors (same device and dtype) and
            # its in-place updates would rewrite the snapshot a later rollback may go back to
            payload, collapse, source = cpu_copy(snap.payload), snap.loop.get("collapse", {}), "memory snapshot"
        else:
            payload, source = load_checkpoint(disk[target]), str(disk[target])
            collapse = RunState.from_dict(payload["state"]).heal.get("collapse", {}) if "state" in payload else {}
        self.trainer.load_state(payload)
        self._drop_damaged_checkpoints(div, disk)
        self.detector.collapse.load_state_dict(collapse)
        row = self._record(div, target, source)
        self.reapply()
        ctx.metrics.abandon_after(target)
        ctx.metrics.write_row({**row, "elapsed_s": ctx.elapsed()})
        ctx.say(f"ROLLBACK {row['rollback']}/{hc.max_rollbacks}: {div.detail}; back to iteration {target} "
                f"({source}); lr x{row['lr_scale']:g}, EMA gap x{row['ema_gap_scale']:g} from now on")
        return target

    def _drop_damaged_checkpoints(self, div: Divergence, disk: dict[int, Path]) -> None:
        """The checkpoints written between the divergence's first flagged step and its detection hold the
        damage: a resume must not continue from one, nor may one be named the last good checkpoint. (Newer
        ones come from before an earlier rollback, when this stretch was run without the damage.)"""
        from chexfound.ssl import distributed as D

        damaged = {it for it in disk if div.onset < it < div.iteration}
        if self.ctx.info.is_main:
            for it in damaged:
                disk[it].unlink(missing_ok=True)
                disk[it].with_suffix(".yaml").unlink(missing_ok=True)
        D.barrier()
        kept = [p for it, p in sorted(disk.items()) if it not in damaged]
        self.last_good = kept[-1] if kept else None

    def _record(self, div: Divergence, target: int, source: str) -> dict[str, Any]:
        """Apply the gentler settings and return the `kind: rollback` row."""
        if self.first is None:
            self.first = div
        self.state.lr_scale *= self.hc.lr_factor
        self.state.ema_gap_scale *= self.hc.ema_factor
        row = {"kind": "rollback", "iteration": target, "detected_at": div.iteration, "onset": div.onset,
               "reason": div.reason, "detail": div.detail, "rolled_back_to": target, "source": source,
               "lr_scale": self.state.lr_scale, "ema_gap_scale": self.state.ema_gap_scale,
               "rollback": len(self.state.rollbacks) + 1, "max_rollbacks": self.hc.max_rollbacks}
        self.state.rollbacks.append({k: row[k] for k in ("detected_at", "onset", "reason", "rolled_back_to",
                                                          "lr_scale", "ema_gap_scale", "source")})
        self.detector.rewind(target)
        self.snapshots = deque((s for s in self.snapshots if s.iteration <= target), maxlen=self.snapshots.maxlen)
        self.last_snapshot_it = target
        return row

    def _give_up(self, div: Divergence) -> NoReturn:
        msg = self.give_up_message(div, self.last_good)
        self.ctx.metrics.write_row({"kind": "gave_up", "iteration": div.iteration, "reason": div.reason,
                                    "message": msg})
        raise (NonFiniteLossError if div.reason == "nonfinite" else DivergedError)(msg)

    def give_up_message(self, div: Divergence, last_checkpoint: Path | None) -> str:
        first = self.first or div
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        n = len(self.state.rollbacks)
        if not self.hc.enabled:
            tried = "healing is off (heal.enabled=false)"
        else:
            tried = (f"{n} rollback(s) (lr x{self.state.lr_scale:g}, EMA gap x{self.state.ema_gap_scale:g}) did not "
                     f"help, the last: {div.detail}; gave up (heal.max_rollbacks={self.hc.max_rollbacks})")
        return (f"{first.detail}; {tried}; stopped, {where}. Lower optim.base_lr, raise optim.warmup_epochs or "
                "use train.dtype=fp32.")

    def state_dict(self) -> dict[str, Any]:
        return {"lr_scale": self.state.lr_scale, "ema_gap_scale": self.state.ema_gap_scale,
                "rollbacks": list(self.state.rollbacks), "detector": self.detector.state_dict(),
                "collapse": self.detector.collapse.state_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.state = HealState(float(d.get("lr_scale", 1.0)), float(d.get("ema_gap_scale", 1.0)),
                               list(d.get("rollbacks", [])))
        self.detector.load_state_dict(d.get("detector", {}))
        self.detector.collapse.load_state_dict(d.get("collapse", {}))
