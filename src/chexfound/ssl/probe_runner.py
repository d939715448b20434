"""Probes during and after a pretraining run (rank 0 computes; every rank joins the gathers under FSDP).

periodic: teacher features on the small probe set (k-NN + linear AUROC) -> metrics.jsonl rows kind=probe.
final:    linear probes of the teacher vs its own iteration-0 weights vs the same architecture at random init
          (`final_random_seeds` seeds) vs raw 32x32 pixels, on each configured task (`probe_comparison`: macro
          AUROC with 95% CIs from a bootstrap over test *patients*, paired differences model - reference =
          teacher - baseline on the same resamples); printed (`Comparison.text_lines`) and written to
          probe_comparison.json ({task: `chexfound.stats.Comparison`}, read by `chexfound.stats.read_comparisons`).

The probe sets are `ProbeSets` (each decoded once, when first needed). The runner measures what probes cost
(`measure_costs`: decoding and features per image after a warm-up batch, the logistic fit on the pixel
baseline of the smallest final set, which is kept) and keeps measuring at every probe, so a time budget plans
with measured numbers (chexfound.ssl.budget). The final comparison follows a `ProbePlan` (tasks, set sizes,
random seeds) and, with a deadline, runs the essential models first (teacher, iteration-0 weights, one random
init, pixels on every task) and the other random inits only while they fit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from chexfound.models import VisionTransformer
from chexfound.ssl import distributed as D
from chexfound.ssl.budget import Clock
from chexfound.ssl.probe import (INIT, PIXELS, TEACHER, ProbeTask, backbone_features, evaluate_features,
                                 linear_probe_scores, probe_comparison, probes_off_reason, random_init, task_columns)
from chexfound.ssl.probe_plan import PERIODIC, ProbeCosts, ProbePlan, plan_from_config
from chexfound.ssl.probe_sets import ProbeSets
from chexfound.ssl.timing import seconds_per_item
from chexfound.stats import pixel_features


class ProbeRunner:
    def __init__(self, cfg: dict[str, Any], trainer: Any, out: Path, say: Callable[[str], None],
                 is_main: bool, clock: Clock = time.perf_counter) -> None:
        self.cfg, self.trainer, self.out, self.say, self.is_main = cfg, trainer, out, say, is_main
        self.clock = clock
        self.p = cfg["probe"]
        self.device = trainer.device
        self.seed = int(cfg["train"]["seed"])
        self.sets = ProbeSets(cfg)
        self.costs = ProbeCosts(feature_dim=2 * int(trainer.vit_config.embed_dim))
        self.pixel_scores: dict[str, tuple[tuple[int, int], np.ndarray]] = {}  # task -> (sizes, test scores)
        self.t_probe: float | None = None
        if is_main and not self.enabled:
            say(f"probe: {probes_off_reason(cfg)}")

    @property
    def enabled(self) -> bool:
        return self.sets.kermany is not None

    @property
    def decoded(self) -> set[str]:
        return self.sets.decoded

    @property
    def task(self) -> ProbeTask | None:
        """The periodic probe set (rank 0, probes on)."""
        if not self.is_main or not self.enabled or int(self.p["n_evals"]) < 0:
            return None
        return self.sets.get(PERIODIC, *self.sets.periodic_sizes())

    # -- what the configured probes are, and what they cost ----------------------------------------------
    def configured_plan(self) -> ProbePlan:
        """The probes as configured, sized from the tasks' labels (rank 0; broadcast)."""
        plan = None
        if self.is_main:
            on = self.enabled and int(self.p["n_evals"]) >= 0
            plan = plan_from_config(self.p, self.sets.final_sets(), on)
            if on:
                plan.periodic_train, plan.periodic_test = self.sets.periodic_sizes()
        return D.broadcast_object(plan)  # type: ignore[return-value]

    def _features(self, model: VisionTransformer, images: torch.Tensor) -> np.ndarray:
        return backbone_features(model, images, self.device, int(self.p["batch_size"]), self.trainer.autocast)

    def _task_features(self, model: VisionTransformer, task: ProbeTask) -> tuple[np.ndarray, np.ndarray]:
        """(train, test) features of `model` on a probe set."""
        return self._features(model, task.train_images), self._features(model, task.test_images)

    def _fit(self, task: ProbeTask, ftr: np.ndarray, fte: np.ndarray) -> np.ndarray:
        """Test logits [n_test, C] of the statistics layer's logistic probe (patient folds)."""
        return linear_probe_scores(ftr, task.train_labels, fte, task.train_groups, seed=self.seed,
                                   n_jobs=int(self.p.get("n_jobs", 1)))

    def measure_costs(self, plan: ProbePlan, min_images: int, sample: torch.Tensor,
                      worth: Callable[[ProbeCosts], bool]) -> ProbeCosts:
        """Features per image, timed on `sample` (uint8 images already at hand, e.g. a training batch;
        `chexfound.ssl.timing.seconds_per_item`); then, when `worth(costs so far)` (the budget's answer: could
        any probe fit, even with free decoding and fits?), decoding per image and the logistic fit per unit,
        on the smallest final Kermany set a plan can use (`min_images` train and test images, decoded here;
        its pixel-baseline scores are kept)."""
        backbone = self.trainer.teacher_backbone()  # collective under FSDP
        kermany = next((f for f in plan.finals if f.task == "kermany"), None)
        if self.is_main and backbone is not None and (kermany is not None or plan.periodic):
            images = sample.cpu()
            self.costs.feature_s = seconds_per_item(lambda n: self._features(backbone, images[:n]),
                                                    min(int(self.p["batch_size"]), len(images)), self.clock,
                                                    self.device)
            if kermany is not None and worth(self.costs):
                m_tr, m_te = min(min_images, kermany.n_train), min(min_images, kermany.n_test)
                t0 = self.clock()
                task = self.sets.get("kermany", m_tr, m_te)
                self.costs.decode_s = (self.clock() - t0) / max(1, m_tr + m_te)
                self.costs.fit_s = self._pixel_fit(task) or 0.0
        self.costs = D.broadcast_object(self.costs)  # type: ignore[assignment]
        return self.costs

    def _pixel_fit(self, task: ProbeTask) -> float | None:
        """Fit the pixel baseline of `task` (kept for the final comparison); returns seconds per fit unit."""
        cols = task_columns(task)
        t0 = self.clock()
        scores = self._fit(task, pixel_features(task.train_images), pixel_features(task.test_images))
        dt = self.clock() - t0
        self.pixel_scores[task.name] = ((len(task.train_labels), len(task.test_labels)), scores)
        units = len(task.train_labels) * self.costs.pixel_dim * max(1, len(cols))
        return dt / units if cols else None

    # -- periodic --------------------------------------------------------------------------------------
    def periodic(self, iteration: int, metrics: Any) -> None:
        if not self.enabled:
            return
        backbone = self.trainer.teacher_backbone()  # collective under FSDP
        task = self.task
        if self.is_main and task is not None and backbone is not None:
            t0 = self.clock()
            ftr, fte = self._task_features(backbone, task)
            t1 = self.clock()
            res = evaluate_features(ftr, fte, task, int(self.p["knn_k"]))
            t2 = self.clock()
            self.t_probe = t2 - t0
            # Keep measuring: the budget's final re-plan uses the latest costs.
            self.costs.feature_s = (t1 - t0) / max(1, len(task.train_labels) + len(task.test_labels))
            self.costs.fit_s = (t2 - t1) / max(1, len(task.train_labels) * ftr.shape[1])
            metrics.write_row({"kind": "probe", "iteration": iteration, "task": "kermany",
                           **{f"probe_{k}": v for k, v in res.items()}, "probe_s": self.t_probe,
                           "probe_features_s": t1 - t0, "probe_fit_s": t2 - t1})
            self.say(f"probe @ {iteration}: Kermany k-NN AUROC {res['knn_auroc']:.3f}, "
                     f"linear AUROC {res['linear_auroc']:.3f} ({self.t_probe:.1f}s)")
        D.barrier()

    def probe_s(self, plan: ProbePlan) -> float:
        return self.costs.periodic_probe_s(plan)

    # -- final comparison ------------------------------------------------------------------------------
    def final_cost(self, plan: ProbePlan) -> float:
        """Seconds the final probes of `plan` would take, with what is decoded and fitted already."""
        done = {k: v[0] for k, v in self.pixel_scores.items()}
        return self.costs.final_probes_s(plan, done, self.decoded)

    def final(self, model_sd: dict[str, torch.Tensor], metrics: Any,
              init_backbone: Callable[[], VisionTransformer] | None = None, plan: ProbePlan | None = None,
              fits: Callable[[float], bool] = lambda seconds: True) -> dict[str, Any]:
        """The final comparison of `plan`: the essential models on every task first (teacher, iteration-0
        weights, one random init, pixels), then the other random inits while `fits(seconds)` (the time
        budget's answer for what the task's first random init took)."""
        if not self.is_main or not self.enabled:
            return {}
        plan = plan or self.configured_plan()
        if not plan.finals:
            return {}
        from chexfound.runio import atomic_write_json
        from chexfound.ssl.checkpoint import teacher_backbone_from_state

        tasks = [self.sets.get(f.task, f.n_train, f.n_test) for f in plan.finals]
        teacher = teacher_backbone_from_state(model_sd, self.trainer.vit_config).to(self.device)
        init = init_backbone().to(self.device) if init_backbone is not None else None  # this run's iteration 0
        essential: list[tuple[str, Callable[[], VisionTransformer] | None]] = [(TEACHER, lambda: teacher)]
        if init is not None:
            essential.append((INIT, lambda: init))
        if plan.random_seeds > 0:
            essential.append((random_init(0), self._random(0)))
        essential.append((PIXELS, None))  # no backbone: the 32x32 pixel baseline
        # (task, model, its backbone's factory, optional): the jobs in the order they run
        jobs = ([(t, name, make, False) for t in tasks for name, make in essential]
                + [(t, random_init(k), self._random(k), True) for k in range(1, plan.random_seeds) for t in tasks])
        scores: dict[str, dict[str, np.ndarray]] = {t.name: {} for t in tasks}
        took: dict[tuple[str, str], float] = {}
        skipped = []
        for task, name, make, optional in jobs:
            if optional and not fits(took[task.name, random_init(0)]):
                skipped.append(f"{task.name} {name}")
                continue
            t0 = self.clock()
            scores[task.name][name] = (self._pixels(task) if make is None
                                       else self._fit(task, *self._task_features(make(), task)))
            took[task.name, name] = self.clock() - t0
        if skipped:
            self.say("final probes: no time left for " + ", ".join(skipped))
            metrics.write_row({"kind": "budget", "event": "final_skipped", "skipped": skipped})
        report: dict[str, Any] = {}
        for task in tasks:
            comp = probe_comparison(task, scores[task.name], self.seed)
            lines = comp.text_lines(f"linear probe on held-out images: {task.name}", "features", "test images")
            for line in ["\n" + lines[0], *lines[1:]]:
                self.say(line)
            metrics.write_row({"kind": "final_probe", "task": task.name,
                               "seconds": sum(s for (t, _), s in took.items() if t == task.name),
                               **{f"{k}_auroc": v.auroc for k, v in comp.models.items()}})
            report[task.name] = comp.to_dict()
        atomic_write_json(self.out / "probe_comparison.json", report)
        return report

    def _random(self, k: int) -> Callable[[], VisionTransformer]:
        """The k-th random init of the run's architecture (seeded 10000 + k: the same weights on every task)."""
        def build() -> VisionTransformer:
            torch.manual_seed(10_000 + k)
            return VisionTransformer(self.trainer.vit_config).to(self.device)
        return build

    def _pixels(self, task: ProbeTask) -> np.ndarray:
        """The pixel baseline's test logits on `task`: the ones `measure_costs` fitted when of this set."""
        cached = self.pixel_scores.get(task.name)
        if cached is not None and cached[0] == (len(task.train_labels), len(task.test_labels)):
            return cached[1]
        return self._fit(task, pixel_features(task.train_images), pixel_features(task.test_images))

