"""Probes during and after a pretraining run (rank 0 computes; every rank joins the gathers under FSDP).

periodic: teacher features on the small probe set (k-NN + linear AUROC) -> metrics.jsonl rows kind=probe.
final:    linear probes of the teacher vs its own iteration-0 weights vs the same architecture at random init
          (`final_random_seeds` seeds) vs raw 32x32 pixels, on each configured task, with bootstrap 95% CIs and
          the paired differences teacher - baseline; printed as a table and written to probe_comparison.json.

Every probe set is decoded once, when the runner is built, so decoding is part of a time budget's measured
setup. The runner also measures what probes cost (`measure_costs`: features per image after a warm-up
batch, the logistic fit from the pixel baseline it needs anyway) and keeps measuring at every probe, so a
time budget plans with measured numbers (chexfound.ssl.budget). The final comparison follows a `ProbePlan`
(set sizes, random seeds) and, with a deadline, runs the essential models first (teacher, iteration-0
weights, one random init, pixels on every task) and the other random inits only while they still fit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from chexfound.models import VisionTransformer
from chexfound.ssl import distributed as D
from chexfound.ssl.budget import Clock, Deadline, FinalSet, ProbeCosts, ProbePlan, plan_from_config, turn_down
from chexfound.ssl.config import expand_path
from chexfound.ssl.probe import (ProbeTask, backbone_features, bootstrap_ci, evaluate_features, kermany_task,
                                 linear_probe_scores, mean_auroc, nih14_task, paired_bootstrap_diff, pixel_features,
                                 task_columns)

log = logging.getLogger(__name__)


def _is_kermany(folder: Path) -> bool:
    f = folder / "labels.csv"
    if not f.is_file():
        return False
    head = f.read_text().splitlines()[:2]
    return len(head) == 2 and "label" in head[0].split(",") and ("NORMAL" in head[1] or "PNEUMONIA" in head[1])


def resolve_kermany(cfg: dict[str, Any]) -> Path | None:
    v = cfg["probe"]["kermany"]
    if v in (None, False, "none", "off"):
        return None
    if v != "auto":
        p = expand_path(v)
        if not _is_kermany(p):
            raise FileNotFoundError(f"probe.kermany: {p} is not a Kermany folder (labels.csv with label column)")
        return p
    for s in cfg["data"]["sources"]:
        p = expand_path(s["path"] if isinstance(s, dict) else s)
        if p.is_dir() and _is_kermany(p):
            return p
    p = expand_path("${CHEXFOUND_DATA}/kermany")
    return p if _is_kermany(p) else None


def take(task: ProbeTask, n_train: int, n_test: int, seed: int) -> ProbeTask:
    """A seeded random subset of a probe task (every per-image field of it, train and test alike)."""
    if n_train >= len(task.train_labels) and n_test >= len(task.test_labels):
        return task
    rng = np.random.default_rng([seed, 17])
    sel = {"train": np.sort(rng.permutation(len(task.train_labels))[:n_train]),
           "test": np.sort(rng.permutation(len(task.test_labels))[:n_test])}
    changes = {}
    for f in dataclasses.fields(task):
        v = getattr(task, f.name)
        side = f.name.split("_")[0]
        if side in sel and v is not None and hasattr(v, "__len__") and not isinstance(v, str):
            idx = sel[side]
            changes[f.name] = v[torch.from_numpy(idx)] if torch.is_tensor(v) else np.asarray(v)[idx]
    return dataclasses.replace(task, **changes)


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
        self.task: ProbeTask | None = None
        self.finals: list[ProbeTask] = []
        self.costs = ProbeCosts(feature_dim=2 * int(trainer.vit_config.embed_dim))
        self.pixel_scores: dict[str, tuple[tuple[int, int], np.ndarray]] = {}  # task -> (sizes, test scores)
        self.t_probe: float | None = None
        if is_main and self.kermany is not None:
            if int(self.p["n_evals"]) >= 0:
                self.task = kermany_task(self.kermany, self.size, int(self.p["n_train"]), int(self.p["n_test"]),
                                         seed=self.seed, workers=self.workers)
            self.finals = self._final_tasks()
        elif is_main and self.kermany is None:
            say("probe: no Kermany folder found (probe.kermany / $CHEXFOUND_DATA); probes are off")

    def _final_tasks(self) -> list[ProbeTask]:
        tasks = [kermany_task(self.kermany, self.size, int(self.p["final_n_train"]), int(self.p["final_n_test"]),
                              seed=self.seed, workers=self.workers)]
        if self.p.get("nih14"):
            tasks.append(nih14_task(expand_path(self.p["nih14"]), self.size, 10**9, 10**9, seed=0,
                                    workers=self.workers))
        return tasks

    @property
    def enabled(self) -> bool:
        return self.kermany is not None

    # -- what the configured probes are, and what they cost ----------------------------------------------
    def configured_plan(self) -> ProbePlan:
        """The probes as configured, with the sizes of the sets actually decoded (rank 0; broadcast)."""
        plan = None
        if self.is_main:
            # probe.final_n_train / final_n_test cap every final task (NIH-14 loads all its patients)
            cap_tr, cap_te = int(self.p["final_n_train"]), int(self.p["final_n_test"])
            finals = [FinalSet(t.name, min(cap_tr, len(t.train_labels)), min(cap_te, len(t.test_labels)),
                               len(task_columns(t))) for t in self.finals]
            plan = plan_from_config(self.p, finals, self.task is not None)
            if self.task is not None:
                plan.periodic_train, plan.periodic_test = len(self.task.train_labels), len(self.task.test_labels)
        return D.broadcast_object(plan)  # type: ignore[return-value]

    def _features(self, model: VisionTransformer, images: torch.Tensor) -> np.ndarray:
        return backbone_features(model, images, self.device, int(self.p["batch_size"]), self.trainer.autocast)

    def _fit(self, ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray) -> np.ndarray:
        return linear_probe_scores(ftr, ytr, fte, n_jobs=int(self.p.get("n_jobs", 1)))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure_costs(self) -> ProbeCosts:
        """Features per image (after an untimed warm-up batch) and the logistic fit per unit, timed on the
        final Kermany set's pixel baseline, whose scores are kept for the final comparison."""
        backbone = self.trainer.teacher_backbone()  # collective under FSDP
        if self.is_main and backbone is not None and (self.task is not None or self.finals):
            src = self.task if self.task is not None else self.finals[0]
            images = src.train_images
            bs = int(self.p["batch_size"])
            n = min(8, len(images), bs)
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
            if self.finals:
                self.costs.fit_s = self._pixel_fit(self.finals[0]) or 0.0
        self.costs = D.broadcast_object(self.costs)  # type: ignore[assignment]
        return self.costs

    def _pixel_fit(self, task: ProbeTask) -> float | None:
        """Fit the pixel baseline of `task` (kept for the final comparison); returns seconds per fit unit."""
        cols = task_columns(task)
        t0 = self.clock()
        scores = self._fit(pixel_features(task.train_images), task.train_labels, pixel_features(task.test_images))
        dt = self.clock() - t0
        self.pixel_scores[task.name] = ((len(task.train_labels), len(task.test_labels)), scores)
        units = len(task.train_labels) * self.costs.pixel_dim * max(1, len(cols))
        return dt / units if cols else None

    # -- periodic --------------------------------------------------------------------------------------
    def periodic(self, iteration: int, metrics: Any) -> None:
        if self.kermany is None:
            return
        backbone = self.trainer.teacher_backbone()  # collective under FSDP
        if self.is_main and self.task is not None and backbone is not None:
            task = self.task
            t0 = self.clock()
            ftr, fte = self._features(backbone, task.train_images), self._features(backbone, task.test_images)
            t1 = self.clock()
            res = evaluate_features(ftr, fte, task, int(self.p["knn_k"]))
            t2 = self.clock()
            self.t_probe = t2 - t0
            # Keep measuring: the budget's final re-plan uses the latest costs.
            self.costs.feature_s = (t1 - t0) / max(1, len(task.train_labels) + len(task.test_labels))
            self.costs.fit_s = (t2 - t1) / max(1, len(task.train_labels) * ftr.shape[1])
            metrics.write({"kind": "probe", "iteration": iteration, "task": "kermany",
                           **{f"probe_{k}": v for k, v in res.items()}, "probe_s": self.t_probe,
                           "probe_features_s": t1 - t0, "probe_fit_s": t2 - t1})
            self.say(f"probe @ {iteration}: Kermany k-NN AUROC {res['knn_auroc']:.3f}, "
                     f"linear AUROC {res['linear_auroc']:.3f} ({self.t_probe:.1f}s)")
        D.barrier()

    def probe_s(self, plan: ProbePlan) -> float:
        return self.costs.periodic_probe_s(plan)

    # -- final comparison ------------------------------------------------------------------------------
    def final(self, model_sd: dict[str, torch.Tensor], metrics: Any,
              init_backbone: Callable[[], VisionTransformer] | None = None, plan: ProbePlan | None = None,
              deadline: Deadline | None = None, margin_s: float = 0.0) -> dict[str, Any]:
        if not self.is_main or not self.finals:
            return {}
        plan = plan or self.configured_plan()
        if deadline is not None:
            done = {k: v[0] for k, v in self.pixel_scores.items()}
            fitted = turn_down(plan, lambda p: self.costs.final_probes_s(p, done), deadline.left_s() - margin_s,
                               int(self.cfg["budget"]["min_final_images"]), stages=("final_sets", "random_seeds"))
            new = fitted.turned_down[len(plan.turned_down):]
            if new:
                self.say("final probes turned down to fit the time left: " + "; ".join(new))
                metrics.write({"kind": "budget", "event": "final_turned_down", "turned_down": new,
                               "left_s": deadline.left_s()})
            plan = fitted
        from chexfound.ssl.checkpoint import teacher_backbone_from_state

        sizes = {f.task: f for f in plan.finals}
        tasks = [take(t, sizes[t.name].n_train, sizes[t.name].n_test, self.seed) for t in self.finals
                 if t.name in sizes]
        teacher = teacher_backbone_from_state(model_sd, self.trainer.vit_config).to(self.device)
        init = init_backbone().to(self.device) if init_backbone is not None else None
        scores: dict[str, dict[str, np.ndarray]] = {t.name: {} for t in tasks}
        seconds: dict[str, float] = {t.name: 0.0 for t in tasks}
        random_s: dict[str, float] = {}

        def backbone_scores(task: ProbeTask, model: VisionTransformer) -> np.ndarray:
            ftr, fte = self._features(model, task.train_images), self._features(model, task.test_images)
            return self._fit(ftr, task.train_labels, fte)

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
                s["pixels_32x32"] = self._fit(pixel_features(task.train_images), task.train_labels,
                                              pixel_features(task.test_images))
            seconds[task.name] += self.clock() - t0
        # ... then the other random inits, while they still fit.
        skipped = []
        for k in range(1, plan.random_seeds):
            for task in tasks:
                if deadline is not None and deadline.left_s() - margin_s < random_s.get(task.name, 0.0):
                    skipped.append(f"{task.name} random_init_seed{k}")
                    continue
                t0 = self.clock()
                scores[task.name][f"random_init_seed{k}"] = backbone_scores(task, random_model(k))
                seconds[task.name] += self.clock() - t0
        if skipped:
            self.say("final probes: no time left for " + ", ".join(skipped))
            metrics.write({"kind": "budget", "event": "final_skipped", "skipped": skipped})
        report: dict[str, Any] = {}
        for task in tasks:
            report[task.name] = self._compare(task, scores[task.name])
            self._print(task.name, report[task.name])
            metrics.write({"kind": "final_probe", "task": task.name, "seconds": seconds[task.name],
                           **{f"{k}_auroc": v["auroc"] for k, v in report[task.name]["auroc"].items()}})
        from chexfound.models.format import atomic_write_bytes

        atomic_write_bytes(self.out / "probe_comparison.json", json.dumps(report, indent=2).encode())
        return report

    def _compare(self, task: ProbeTask, scores: dict[str, np.ndarray]) -> dict[str, Any]:
        """AUROC with a bootstrap CI per model, and the paired differences teacher - each baseline."""
        cols = task_columns(task)
        y = task.test_labels
        order = (["teacher", "init (iteration 0)"] + sorted((k for k in scores if k.startswith("random_init")),
                                                    key=lambda k: int(k.rsplit("seed", 1)[1]))
                 + ["pixels_32x32"])
        rows = {k: self._row(scores[k], y, cols) for k in order if k in scores}
        short = {"init (iteration 0)": "init", "pixels_32x32": "pixels"}
        diffs = {}
        for k in order[1:]:
            if k in scores:
                d, lo, hi = paired_bootstrap_diff(scores["teacher"], scores[k], y, cols)
                name = short.get(k, k.replace("random_init_seed", "random_seed"))
                diffs[f"teacher_minus_{name}"] = {"diff": d, "ci95": [lo, hi]}
        return {"n_train": int(len(task.train_labels)), "n_test": int(len(y)),
                "findings": [task.label_names[c] for c in cols], "auroc": rows, "paired": diffs}

    @staticmethod
    def _row(scores: np.ndarray, y: np.ndarray, cols: list[int]) -> dict[str, Any]:
        lo, hi = bootstrap_ci(scores, y, cols)
        return {"auroc": mean_auroc(scores, y, cols), "ci95": [lo, hi]}

    def _print(self, name: str, r: dict[str, Any]) -> None:
        self.say(f"\nlinear probe on held-out images: {name} (train {r['n_train']}, test {r['n_test']}, "
                 f"{'mean AUROC over ' + str(len(r['findings'])) + ' findings' if len(r['findings']) > 1 else 'AUROC'})")
        self.say(f"  {'features':<22} {'AUROC':>7}   95% CI")
        for k, v in r["auroc"].items():
            self.say(f"  {k:<22} {v['auroc']:7.3f}   [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]")
        self.say("  paired difference (same test images, bootstrap 95% CI):")
        for k, v in r["paired"].items():
            sig = "  *" if v["ci95"][0] > 0 or v["ci95"][1] < 0 else ""
            self.say(f"  {k:<28} {v['diff']:+.3f}   [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]{sig}")
