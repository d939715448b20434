"""The demo's evaluations on top of its fitted heads: the paired comparisons (model - reference), the Kermany
label-efficiency curve, GLoRI attention against NIH's expert boxes, and heatmap overlays (`chexfound demo`'s
stages after the heads; `chexfound.demo.pipeline` runs them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from chexfound.demo.tasks import (NIH_BOX_RENAME, DemoConfig, TaskSpec, pixel_source, probe_inputs, split_rows,
                                  task_manifest)
from chexfound.models import create_backbone


# The demo's models per task, by display name: (test-probability file under cache/, where results keep its
# metrics: (results["models"] key, head or None for the pixel baseline)).
def demo_models(task: str) -> dict[str, tuple[str, tuple[str, str | None]]]:
    out = {"pretrained (linear)": (f"pretrained/{task}-linear", (f"pretrained/{task}", "linear")),
           "random (linear)": (f"random/{task}-linear", (f"random/{task}", "linear")),
           "pixels (logistic)": (f"pixels-{task}", (f"pixels/{task}", None))}
    if task == "nih14":
        out.update({"pretrained (GLoRI)": ("pretrained/nih14-glori", ("pretrained/nih14", "glori")),
                    "random (GLoRI)": ("random/nih14-glori", ("random/nih14", "glori"))})
    return out


# The paired differences the report shows, model - reference, per task.
DEMO_PAIRS: dict[str, list[tuple[str, str]]] = {
    "kermany": [("pretrained (linear)", "random (linear)"), ("pretrained (linear)", "pixels (logistic)")],
    "nih14": [("pretrained (linear)", "random (linear)"), ("pretrained (GLoRI)", "random (GLoRI)"),
              ("pretrained (GLoRI)", "pretrained (linear)"), ("pretrained (linear)", "pixels (logistic)")],
}


def compare_task(cfg: DemoConfig, task: TaskSpec, models: dict[str, Any],
                 pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """One task's `chexfound.stats.Comparison`: each model's test macro AUROC with its CI (from `models`, the
    results of `fit_and_score` / `pixel_baseline`), and the paired patient-level bootstrap of test macro
    AUROC/AP, model - reference, on the same test images."""
    from chexfound.stats import BootstrapConfig, Comparison, ModelResult, PairedDifference, paired_difference

    m = task_manifest(task.manifest, task.findings)
    test = split_rows(m)["test"]
    y, pats = m.labels()[test], m.patients()[test]
    bcfg = BootstrapConfig(n_boot=cfg.n_boot, seed=cfg.seed)
    named = demo_models(task.name)
    used = list(dict.fromkeys(n for pair in pairs for n in pair))
    results: dict[str, ModelResult] = {}
    for name in used:
        key, head = named[name][1]
        res = models[key] if head is None else models[key]["heads"][head]
        results[name] = ModelResult.from_metrics({"macro": res["metrics"]["macro"]})
    comp = Comparison(list(task.findings), results, bootstrap={"n_boot": bcfg.n_boot, "ci": bcfg.ci,
                                                               "seed": bcfg.seed, "level": bcfg.level})
    for a, b in pairs:
        pa, pb = (np.load(cfg.out / "cache" / f"{named[n][0]}-test-probs.npy") for n in (a, b))
        if len(pa) != len(test) or len(pb) != len(test):
            comp.add(PairedDifference(a, b, error="some test images were unreadable for one model; "
                                                  "no paired comparison"))
            continue
        comp.add(paired_difference(y, (a, pa), (b, pb), task.findings, pats, bcfg))
    return comp.to_dict()


def label_efficiency(cfg: DemoConfig, task: TaskSpec, echo: Callable[[str], None]) -> dict[str, Any]:
    """Kermany test AUROC vs share of training patients: the logistic probe on pretrained / random features
    and on pixels (the same fitter for all three)."""
    from chexfound.adapt.token_cache import FeatureCache
    from chexfound.evaluate.protocols.common import EvalConfig, Splits
    from chexfound.evaluate.protocols.label_efficiency import run_label_efficiency
    from chexfound.stats import BootstrapConfig, LogisticTrainer

    m = task_manifest(task.manifest, task.findings)
    y, pats = m.labels(), m.patients()
    sp = split_rows(m)
    fractions = (0.02, 0.1, 1.0) if cfg.quick else (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
    seeds = (0,) if cfg.quick else (0, 1, 2)
    ecfg = EvalConfig(bootstrap=BootstrapConfig(n_boot=0))
    out: dict[str, Any] = {}
    sources: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for which in ("pretrained", "random"):
        cache = FeatureCache.open(cfg.out / "cache" / which / task.name)
        sources[which] = (probe_inputs(cache, cache.n_blocks), np.asarray(cache.valid, dtype=bool))
    sources["pixels"] = pixel_source(cfg, task)  # unreadable images out, as for the backbones' caches
    for which, (feats, ok) in sources.items():
        splits = Splits(sp["train"][ok[sp["train"]]], sp["val"][ok[sp["val"]]], sp["test"][ok[sp["test"]]])
        metrics, _ = run_label_efficiency(LogisticTrainer(), feats, y, pats, splits, task.findings, fractions, seeds,
                                          ecfg)
        out[which] = {"curve": metrics["curve"], "runs": metrics["runs"]}
        echo(f"  label efficiency {which}: " + ", ".join(f"{c['fraction']:.0%} {c['auroc_mean']:.3f}"
                                                        for c in metrics["curve"]))
    return out


def localisation(cfg: DemoConfig, task: TaskSpec, echo: Callable[[str], None]) -> dict[str, Any]:
    """GLoRI attention vs NIH expert boxes on the NIH test split (pointing game, mass in boxes, centre prior)."""
    from chexfound.adapt import load_head
    from chexfound.evaluate.figures import heatmap_gallery
    from chexfound.evaluate.box_scores import read_boxes
    from chexfound.evaluate.protocols.localisation import collect_items, head_attention_heatmaps, run_localisation
    from chexfound.runio import atomic_write_bytes

    m = task_manifest(task.manifest, task.findings)
    test = split_rows(m)["test"]
    boxes = read_boxes(cfg.data / "nih14" / "boxes.csv", rename=NIH_BOX_RENAME)
    out: dict[str, Any] = {}
    for which in ("pretrained", "random"):
        model = create_backbone(cfg.out / "models" / which / "backbone.safetensors")
        head = load_head(cfg.out / "models" / which / f"{task.name}-glori.safetensors")
        tf = model.info.transform
        paths = [m.paths()[i] for i in test]
        ids = m.df["image_id"].astype(str).to_numpy()[test]
        scores, gallery, errors = collect_items(paths, ids, m.patients()[test], boxes, task.findings, tf,
                                                head_attention_heatmaps(model, head), gallery=8)
        res = run_localisation(scores, f"GLoRI attention ({which} backbone)", n_boot=cfg.n_boot, seed=cfg.seed)
        res.pop("items", None)
        if gallery:
            atomic_write_bytes(cfg.out / "figures" / f"localisation-{which}.png", heatmap_gallery(gallery))
        out[which] = res
        ov = res.get("overall", {})
        echo(f"  localisation {which}: " + ", ".join(f"{k} {v:.3f}" for k, v in ov.items()
                                                     if isinstance(v, float)))
    return out


def heatmap_overlays(cfg: DemoConfig, task: TaskSpec, n_images: int = 4) -> dict[str, Any]:
    """Per-finding GLoRI overlays (top 3 findings) for a few NIH test images, pretrained backbone."""
    from chexfound.adapt import load_head
    from chexfound.adapt.forward import head_forward
    from chexfound.adapt.heatmap import save_heatmaps
    from chexfound.io import read_image

    model = create_backbone(cfg.out / "models" / "pretrained" / "backbone.safetensors")
    head = load_head(cfg.out / "models" / "pretrained" / f"{task.name}-glori.safetensors")
    tf = model.info.transform
    m = task_manifest(task.manifest, task.findings)
    test = split_rows(m)["test"][:n_images]
    files: list[str] = []
    for i in test:
        p = m.paths()[i]
        img = read_image(p)
        with torch.no_grad():
            _, logits, attn = head_forward(model, head, tf(img.pixels)[None])
        probs = head.probabilities(logits)[0].numpy()
        files += [str(f) for f in save_heatmaps(attn[0], probs, head.findings, img.pixels, tf,
                                                cfg.out / "heatmaps", Path(p).stem, top_k=3, original_space=True)]
    return {"files": files}
