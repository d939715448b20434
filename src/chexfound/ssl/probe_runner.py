"""Probes during and after a pretraining run (rank 0 computes; every rank joins the gathers under FSDP).

periodic: teacher features on the small probe set (k-NN + linear AUROC) -> metrics.jsonl rows kind=probe.
final:    linear probes of the teacher vs its own iteration-0 weights vs the same architecture at random init
          (`final_random_seeds` seeds) vs raw 32x32 pixels, on each configured task: the statistics layer's
          logistic probe and its comparison (`chexfound.stats.compare_scores`): macro AUROC with 95% CIs
          from a bootstrap over test *patients* and the paired differences model - reference = teacher -
          baseline on the same resamples; printed as a table and written to probe_comparison.json
          ({task: `chexfound.stats.Comparison`}, read back with `chexfound.stats.read_comparisons`).

Every probe set is decoded once, when first needed (a set a time budget turns down is never decoded). The
runner measures what probes cost (`measure_costs`: decoding and features per image after a warm-up batch, the
logistic fit on the pixel baseline of the smallest final set, which is kept) and keeps measuring at every
probe, so a time budget plans with measured numbers (chexfound.ssl.budget). The final comparison follows a
`ProbePlan` (tasks, set sizes, random seeds) and, with a deadline, runs the essential models first (teacher,
iteration-0 weights, one random init, pixels on every task) and the other random inits only while they fit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from chexfound.models import VisionTransformer
from chexfound.ssl import distributed as D
from chexfound.ssl.budget import Clock
from chexfound.ssl.probe_plan import PERIODIC, FinalSet, ProbeCosts, ProbePlan, plan_from_config, set_key
from chexfound.ssl.config import expand_path
from chexfound.ssl.probe import (ProbeTask, backbone_features, evaluate_features, kermany_task, linear_probe_scores,
                                 nih14_task, probes_off_reason, resolve_kermany, split_sizes,
                                 task_columns)
from chexfound.stats import DIFFERENCE, BootstrapConfig, Comparison, compare_scores, pixel_features

log = logging.getLogger(__name__)


class ProbeRunner:
    def __init__(self, cfg: dict[str, Any], trainer: Any, out: Path, say: Callable[[str], None],
                 is_main: bool, clock: Clock = time.perf_counter) -> None:
        self.cfg, self.trainer, self.out, self.say, self.is_main = cfg, trainer, out, say, is_main
        self.clock = clock
        self.p = cfg["probe"]
        self.size = int(cfg["crops"]["global_crops_size"])
        self.device = trainer.device
        self.seed = int(cfg["train"]["seed"])
        self.workers = int(cfg["data"]["num_workers"])
        self.kermany = resolve_kermany(cfg)
        self.nih14 = expand_path(self.p["nih14"]) if self.p.get("nih14") and self.kermany is not None else None
        self.costs = ProbeCosts(feature_dim=2 * int(trainer.vit_config.embed_dim))
        self.pixel_scores: dict[str, tuple[tuple[int, int], np.ndarray]] = {}  # task -> (sizes, test scores)
        self._sets: dict[str, ProbeTask] = {}  # decoded probe sets by set_key
        self.t_probe: float | None = None
        if is_main and self.kermany is None:
            say(f"probe: {probes_off_reason(cfg)}")

    @property
    def enabled(self) -> bool:
        return self.kermany is not None

    # -- probe sets, decoded when first needed ---------------------------------------------------------
    def _set(self, task: str, n_train: int, n_test: int) -> ProbeTask:
        """A probe set: seeded random subsets of the task's train and test splits (a smaller set of the same
        task is a subset of a larger one)."""
        key = set_key(task, n_train, n_test)
        if key not in self._sets:
            if task in ("kermany", PERIODIC):
                t = kermany_task(self.kermany, self.size, n_train, n_test, seed=self.seed, workers=self.workers)
            else:
                t = nih14_task(self.nih14, self.size, n_train, n_test, seed=0, workers=self.workers)
            self._sets[key] = t
        return self._sets[key]

    @property
    def decoded(self) -> set[str]:
        return set(self._sets)

    @property
    def task(self) -> ProbeTask | None:
        """The periodic probe set (rank 0, probes on)."""
        if not self.is_main or self.kermany is None or int(self.p["n_evals"]) < 0:
            return None
        return self._set(PERIODIC, *self._periodic_sizes())

    def _periodic_sizes(self) -> tuple[int, int]:
        if not hasattr(self, "_periodic"):
            n_tr, n_te, _ = split_sizes("kermany", self.kermany)  # type: ignore[arg-type]
            self._periodic = (min(int(self.p["n_train"]), n_tr), min(int(self.p["n_test"]), n_te))
        return self._periodic

    # -- what the configured probes are, and what they cost ----------------------------------------------
    def configured_plan(self) -> ProbePlan:
        """The probes as configured, sized from the tasks' labels (rank 0; broadcast)."""
        plan = None
        if self.is_main:
            finals = []
            on = self.kermany is not None and int(self.p["n_evals"]) >= 0
            if self.kermany is not None:
                # probe.final_n_train / final_n_test cap every final task (NIH-14 would take all its patients)
                cap_tr, cap_te = int(self.p["final_n_train"]), int(self.p["final_n_test"])
                for name, root in (("kermany", self.kermany), ("nih14", self.nih14)):
                    if root is not None:
                        n_tr, n_te, n_f = split_sizes(name, root)
                        finals.append(FinalSet(name, min(cap_tr, n_tr), min(cap_te, n_te), n_f))
            plan = plan_from_config(self.p, finals, on)
            if on:
                plan.periodic_train, plan.periodic_test = self._periodic_sizes()
        return D.broadcast_object(plan)  # type: ignore[return-value]

    def _features(self, model: VisionTransformer, images: torch.Tensor) -> np.ndarray:
        return backbone_features(model, images, self.device, int(self.p["batch_size"]), self.trainer.autocast)

    def _fit(self, task: ProbeTask, ftr: np.ndarray, fte: np.ndarray) -> np.ndarray:
        """Test logits [n_test, C] of the statistics layer's logistic probe (patient folds)."""
        return linear_probe_scores(ftr, task.train_labels, fte, task.train_groups, seed=self.seed,
                                   n_jobs=int(self.p.get("n_jobs", 1)))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure_costs(self, plan: ProbePlan, min_images: int, sample: torch.Tensor,
                      worth: Callable[[ProbeCosts], bool]) -> ProbeCosts:
        """Features per image, timed on `sample` (uint8 images already at hand, e.g. a training batch: an
        untimed warm-up batch, then timed batches of growing size); then, when `worth(costs so far)` (the
        budget's answer: could any probe fit, even with free decoding and fits?), decoding per image and the logistic fit per unit, on the smallest final Kermany set a plan can
        use (`min_images` train and test images, decoded here; its pixel-baseline scores are kept)."""
        backbone = self.trainer.teacher_backbone()  # collective under FSDP
        kermany = next((f for f in plan.finals if f.task == "kermany"), None)
        if self.is_main and backbone is not None and (kermany is not None or plan.periodic):
            images = sample.cpu()
            bs = int(self.p["batch_size"])
            n = min(4, len(images), bs)
            self._features(backbone, images[:n])  # warm-up: allocator, kernel selection
            while True:
                self._sync()
                t0 = self.clock()
                self._features(backbone, images[:n])
                self._sync()
                dt = self.clock() - t0
                if dt >= 0.5 or n >= min(bs, len(images)):
                    break
                n = min(2 * n, bs, len(images))
            self.costs.feature_s = dt / n
            if kermany is not None and worth(self.costs):
                m_tr, m_te = min(min_images, kermany.n_train), min(min_images, kermany.n_test)
                t0 = self.clock()
                task = self._set("kermany", m_tr, m_te)
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
        if self.kermany is None:
            return
        backbone = self.trainer.teacher_backbone()  # collective under FSDP
        task = self.task
        if self.is_main and task is not None and backbone is not None:
            t0 = self.clock()
            ftr, fte = self._features(backbone, task.train_images), self._features(backbone, task.test_images)
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
        """The final comparison of `plan`; `fits(seconds)`: whether an optional random init still fits (the
        time budget's answer)."""
        if not self.is_main or self.kermany is None:
            return {}
        plan = plan or self.configured_plan()
        from chexfound.ssl.checkpoint import teacher_backbone_from_state

        if not plan.finals:
            return {}
        tasks = [self._set(f.task, f.n_train, f.n_test) for f in plan.finals]
        teacher = teacher_backbone_from_state(model_sd, self.trainer.vit_config).to(self.device)
        init = init_backbone().to(self.device) if init_backbone is not None else None
        scores: dict[str, dict[str, np.ndarray]] = {t.name: {} for t in tasks}
        seconds: dict[str, float] = {t.name: 0.0 for t in tasks}
        random_s: dict[str, float] = {}

        def backbone_scores(task: ProbeTask, model: VisionTransformer) -> np.ndarray:
            ftr, fte = self._features(model, task.train_images), self._features(model, task.test_images)
            return self._fit(task, ftr, fte)

        def random_model(k: int) -> VisionTransformer:
            torch.manual_seed(10_000 + k)
            return VisionTransformer(self.trainer.vit_config).to(self.device)

        # The essential comparison first, on every task ...
        for task in tasks:
            t0 = self.clock()
            s = scores[task.name]
            s["teacher"] = backbone_scores(task, teacher)
            if init is not None:
                s["init (iteration 0)"] = backbone_scores(task, init)  # this run's own iteration-0 weights
            if plan.random_seeds > 0:
                t1 = self.clock()
                s["random_init_seed0"] = backbone_scores(task, random_model(0))
                random_s[task.name] = self.clock() - t1
            cached = self.pixel_scores.get(task.name)
            if cached is not None and cached[0] == (len(task.train_labels), len(task.test_labels)):
                s["pixels_32x32"] = cached[1]
            else:
                s["pixels_32x32"] = self._fit(task, pixel_features(task.train_images), pixel_features(task.test_images))
            seconds[task.name] += self.clock() - t0
        # ... then the other random inits, while they still fit.
        skipped = []
        for k in range(1, plan.random_seeds):
            for task in tasks:
                if not fits(random_s.get(task.name, 0.0)):
                    skipped.append(f"{task.name} random_init_seed{k}")
                    continue
                t0 = self.clock()
                scores[task.name][f"random_init_seed{k}"] = backbone_scores(task, random_model(k))
                seconds[task.name] += self.clock() - t0
        if skipped:
            self.say("final probes: no time left for " + ", ".join(skipped))
            metrics.write_row({"kind": "budget", "event": "final_skipped", "skipped": skipped})
        report: dict[str, Any] = {}
        for task in tasks:
            comp = self._compare(task, scores[task.name])
            self._print(task.name, comp)
            metrics.write_row({"kind": "final_probe", "task": task.name, "seconds": seconds[task.name],
                           **{f"{k}_auroc": v.auroc for k, v in comp.models.items()}})
            report[task.name] = comp.to_dict()
        from chexfound.runio import atomic_write_json

        atomic_write_json(self.out / "probe_comparison.json", report)
        return report

    def _compare(self, task: ProbeTask, scores: dict[str, np.ndarray]) -> Comparison:
        """The statistics layer's comparison: AUROC with a patient-bootstrap CI per model, and the paired
        differences teacher - each baseline (model - reference) on the same resamples."""
        cols = task_columns(task)
        names = [task.label_names[c] for c in cols]
        order = (["teacher", "init (iteration 0)"] + sorted((k for k in scores if k.startswith("random_init")),
                                                    key=lambda k: int(k.rsplit("seed", 1)[1]))
                 + ["pixels_32x32"])
        ordered = {k: scores[k][:, cols] for k in order if k in scores}
        y = task.test_labels[:, cols]
        comp = compare_scores(y, ordered, names, task.test_groups, cfg=BootstrapConfig(seed=self.seed),
                              pairs=[("teacher", k) for k in ordered if k != "teacher"])
        comp.extra = {"n_train": int(len(task.train_labels)), "n_test": int(len(y)),
                      "probe": "chexfound.stats logistic probe (C by 3-fold patient cross-validation)"}
        return comp

    def _print(self, name: str, c: Comparison) -> None:
        n_train, n_test = c.extra["n_train"], c.extra["n_test"]
        self.say(f"\nlinear probe on held-out images: {name} (train {n_train}, test {n_test}, "
                 f"{'mean AUROC over ' + str(len(c.findings)) + ' findings' if len(c.findings) > 1 else 'AUROC'})")
        self.say(f"  {'features':<22} {'AUROC':>7}   95% CI")
        for k, v in c.models.items():
            self.say(f"  {k:<22} {v.auroc:7.3f}   [{v.auroc_ci[0]:.3f}, {v.auroc_ci[1]:.3f}]")
        unit = c.bootstrap.get("unit", "images")
        self.say(f"  paired difference ({DIFFERENCE}, same test images, 95% CI from a bootstrap over {unit}):")
        for k, p in c.paired.items():
            d = p.auroc
            sig = "  *" if d.excludes_zero else ""
            self.say(f"  {k:<34} {d.diff:+.3f}   [{d.ci[0]:+.3f}, {d.ci[1]:+.3f}]{sig}")
