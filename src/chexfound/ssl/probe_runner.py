"""Probes during and after a pretraining run (rank 0 computes; every rank joins the gathers under FSDP).

periodic: teacher features on the small probe set (k-NN + linear AUROC) -> metrics.jsonl rows kind=probe.
final:    linear probes of the teacher vs the same architecture at random init (`final_random_seeds` seeds) vs
          raw 32x32 pixels, on each configured task: the statistics layer's logistic probe and its
          comparison table (`chexfound.stats.compare_scores`): macro AUROC with 95% CIs from a bootstrap over
          test *patients* and the paired differences teacher - baseline on the same resamples; printed as a
          table and written to probe_comparison.json.
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
from chexfound.ssl.config import expand_path
from chexfound.ssl.probe import (ProbeTask, backbone_features, kermany_task, linear_probe_scores, nih14_task,
                                 probe_backbone, task_columns)
from chexfound.stats import BootstrapConfig, compare_scores, pixel_features

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


class ProbeRunner:
    def __init__(self, cfg: dict[str, Any], trainer: Any, out: Path, say: Callable[[str], None],
                 is_main: bool) -> None:
        self.cfg, self.trainer, self.out, self.say, self.is_main = cfg, trainer, out, say, is_main
        self.p = cfg["probe"]
        self.size = int(cfg["crops"]["global_crops_size"])
        self.device = trainer.device
        self.kermany = resolve_kermany(cfg)
        self.task: ProbeTask | None = None
        self.t_probe: float | None = None
        if is_main and self.kermany is not None and int(self.p["n_evals"]) >= 0:
            self.task = kermany_task(self.kermany, self.size, int(self.p["n_train"]), int(self.p["n_test"]),
                                     seed=int(cfg["train"]["seed"]))
        elif is_main and self.kermany is None:
            say("probe: no Kermany folder found (probe.kermany / $CHEXFOUND_DATA); probes are off")

    # -- cost estimate for time budgets ----------------------------------------------------------------
    def reserve_s(self) -> float:
        t = self.t_probe if self.t_probe is not None else 0.0
        t = float(D.broadcast_object(t))
        n_per = int(self.p["n_train"]) + int(self.p["n_test"])
        n_fin = int(self.p["final_n_train"]) + int(self.p["final_n_test"])
        # NIH-14 fits 13 findings on ~380 images: about 5 Kermany probes' worth of logistic regressions.
        tasks = 1 + 5 * int(bool(self.p.get("nih14")))
        final = t * n_fin / max(1, n_per) * (2 + int(self.p["final_random_seeds"])) * tasks
        return t * int(self.p["n_evals"]) + final + 10.0

    # -- periodic --------------------------------------------------------------------------------------
    def periodic(self, iteration: int, metrics: Any) -> None:
        if self.kermany is None:
            return
        backbone = self.trainer.teacher_backbone()  # collective under FSDP
        if self.is_main and self.task is not None and backbone is not None:
            t0 = time.perf_counter()
            res = probe_backbone(backbone, self.task, self.device, int(self.p["knn_k"]), int(self.p["batch_size"]),
                                 autocast=self.trainer.autocast)
            self.t_probe = time.perf_counter() - t0
            metrics.write("probe", iteration=iteration, task="kermany",
                          **{f"probe_{k}": v for k, v in res.items()}, probe_s=self.t_probe)
            self.say(f"probe @ {iteration}: Kermany k-NN AUROC {res['knn_auroc']:.3f}, "
                     f"linear AUROC {res['linear_auroc']:.3f} ({self.t_probe:.1f}s)")
        D.barrier()

    # -- final comparison ------------------------------------------------------------------------------
    def _final_tasks(self) -> list[ProbeTask]:
        seed = int(self.cfg["train"]["seed"])
        tasks = []
        if self.kermany is not None:
            tasks.append(kermany_task(self.kermany, self.size, int(self.p["final_n_train"]),
                                      int(self.p["final_n_test"]), seed=seed))
        if self.p.get("nih14"):
            tasks.append(nih14_task(expand_path(self.p["nih14"]), self.size, 10**9, 10**9, seed=0))
        return tasks

    def final(self, model_sd: dict[str, torch.Tensor], metrics: Any,
              init_backbone: Callable[[], VisionTransformer] | None = None) -> dict[str, Any]:
        if not self.is_main:
            return {}
        tasks = self._final_tasks()
        if not tasks:
            return {}
        from chexfound.ssl.checkpoint import teacher_backbone_from_state

        teacher = teacher_backbone_from_state(model_sd, self.trainer.vit_config).to(self.device)
        bs = int(self.p["batch_size"])
        seed = int(self.cfg["train"]["seed"])
        report: dict[str, Any] = {}
        for task in tasks:
            cols = task_columns(task)
            y = task.test_labels[:, cols]
            names = [task.label_names[c] for c in cols]

            def scores_of(ftr: np.ndarray, fte: np.ndarray) -> np.ndarray:
                return linear_probe_scores(ftr, task.train_labels, fte, task.train_groups, seed=seed,
                                           n_jobs=int(self.p.get("n_jobs", 1)))[:, cols]

            def backbone_scores(model: VisionTransformer) -> np.ndarray:
                return scores_of(backbone_features(model, task.train_images, self.device, bs, self.trainer.autocast),
                                 backbone_features(model, task.test_images, self.device, bs, self.trainer.autocast))

            scores: dict[str, np.ndarray] = {"teacher": backbone_scores(teacher)}
            paired_name = {}
            if init_backbone is not None:
                # This run's own iteration-0 weights: same seed, same architecture, untrained.
                scores["init (iteration 0)"] = backbone_scores(init_backbone().to(self.device))
                paired_name["init (iteration 0)"] = "init"
            for k in range(int(self.p["final_random_seeds"])):
                torch.manual_seed(10_000 + k)
                rnd = VisionTransformer(self.trainer.vit_config).to(self.device)
                scores[f"random_init_seed{k}"] = backbone_scores(rnd)
                paired_name[f"random_init_seed{k}"] = f"random_seed{k}"
                del rnd
            scores["pixels_32x32"] = scores_of(pixel_features(task.train_images), pixel_features(task.test_images))
            paired_name["pixels_32x32"] = "pixels"
            table = compare_scores(y, scores, names, task.test_groups, "teacher", BootstrapConfig(seed=seed))
            diffs = {f"teacher_minus_{paired_name[m]}": table["paired"][f"teacher_minus_{m}"] for m in paired_name}
            report[task.name] = {"n_train": int(len(task.train_labels)), "n_test": int(len(y)), "findings": names,
                                 "auroc": table["auroc"], "paired": diffs, "bootstrap": table["bootstrap"],
                                 "probe": "chexfound.stats logistic probe (C by 3-fold patient cross-validation)"}
            self._print(task.name, report[task.name])
            metrics.write("final_probe", task=task.name,
                          **{f"{k}_auroc": v["auroc"] for k, v in table["auroc"].items()})
        from chexfound.runio import atomic_write_json

        atomic_write_json(self.out / "probe_comparison.json", report)
        return report

    def _print(self, name: str, r: dict[str, Any]) -> None:
        self.say(f"\nlinear probe on held-out images: {name} (train {r['n_train']}, test {r['n_test']}, "
                 f"{'mean AUROC over ' + str(len(r['findings'])) + ' findings' if len(r['findings']) > 1 else 'AUROC'})")
        self.say(f"  {'features':<22} {'AUROC':>7}   95% CI")
        for k, v in r["auroc"].items():
            self.say(f"  {k:<22} {v['auroc']:7.3f}   [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]")
        unit = r.get("bootstrap", {}).get("unit", "images")
        self.say(f"  paired difference (same test images, 95% CI from a bootstrap over {unit}):")
        for k, v in r["paired"].items():
            sig = "  *" if v["ci95"][0] > 0 or v["ci95"][1] < 0 else ""
            self.say(f"  {k:<28} {v['diff']:+.3f}   [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]{sig}")
