"""`chexfound demo`: pretrain -> cache features -> GLoRI/linear heads -> evaluate with CIs -> explain.

Everything runs on real chest X-rays from the shared data folder, on a CPU, in minutes. Three honest
comparisons are always shown side by side: the pretrained backbone, the same architecture at random init,
and 32x32 raw pixels. The three are the same computation as the pretraining probes' final comparison
(`chexfound.stats`): the one logistic probe (on pooled backbone features, or on the pixels; its weights become
the `linear` head files), thresholds chosen by `chexfound.stats.thresholds`, CIs and paired differences from
the patient-level bootstrap. GLoRI heads are trained by the adapt stage. A tiny model on a few thousand images
is not CheXFound; the report says what the numbers show and nothing more.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from chexfound.data.manifest import patient_split
from chexfound.data.readers import read_kermany, read_nih14_shared
from chexfound.demo.evaluations import DEMO_PAIRS, compare_task, heatmap_overlays, label_efficiency, localisation
from chexfound.demo.stages import StageRunner
from chexfound.demo.tasks import (NIH_EXCLUDE, DemoConfig, TaskSpec, pixel_source, probe_inputs,  # noqa: F401
                                  split_rows, task_manifest)  # (pixel_source: re-exported for callers of this module)
from chexfound.errors import ConfigError
from chexfound.models import backbone_sha256, create_backbone, save_backbone
from chexfound.models.card_results import evaluate_tables
from chexfound.models.vit import VisionTransformer

log = logging.getLogger(__name__)


def repo_weights_dir() -> Path:
    """weights/ of the source checkout (the package is installed from it in editable mode)."""
    env = os.environ.get("CHEXFOUND_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "weights"


def find_shipped_backbone(preset: str) -> Path | None:
    root = repo_weights_dir()
    for cand in sorted(root.glob(f"{preset}*/backbone*.safetensors")) + sorted(root.glob("*/backbone*.safetensors")):
        return cand
    return None


# -- data ----------------------------------------------------------------------------------------------------

def _stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n row indices keeping the class balance of a binary label (quick mode)."""
    rng = np.random.default_rng(seed)
    idx = np.arange(len(y))
    if n >= len(y):
        return idx
    pos, neg = idx[y == 1], idx[y != 1]
    k = int(round(n * len(pos) / len(y)))
    return np.sort(np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, n - k, replace=False)]))


def prepare_data(cfg: DemoConfig) -> dict[str, Any]:
    """Manifests for the demo: Kermany (official train/test; 10% of train patients as val), NIH-14 (patient
    split 60/20/20), and the unlabelled pretraining corpus (Kermany train + NIH train: never an evaluation
    image)."""
    ddir = cfg.out / "data"
    ddir.mkdir(parents=True, exist_ok=True)
    k = read_kermany(cfg.data / "kermany")
    kdf = k.df.copy()
    kdf["path"] = [str(p) for p in k.paths()]
    if cfg.quick:
        keep = np.zeros(len(kdf), dtype=bool)
        for split, n in (("train", 800), ("test", 300)):
            rows = np.flatnonzero(kdf["split"].to_numpy() == split)
            keep[rows[_stratified_subset(kdf["PNEUMONIA"].to_numpy()[rows], n, cfg.seed)]] = True
        kdf = kdf[keep].reset_index(drop=True)
    train_rows = kdf["split"].to_numpy() == "train"
    sub = patient_split(kdf.loc[train_rows, "patient_id"].to_numpy(), (0.9, 0.1), ("train", "val"), seed=cfg.seed)
    kdf.loc[train_rows, "split"] = sub
    kdf[["path", "patient_id", "split", "label", "PNEUMONIA"]].to_csv(ddir / "kermany.csv", index=False)

    n = read_nih14_shared(cfg.data / "nih14")
    ndf = n.df.copy()
    ndf["path"] = [str(p) for p in n.paths()]
    ndf["split"] = patient_split(ndf["patient_id"].to_numpy(), (0.6, 0.2, 0.2), seed=cfg.seed)
    ndf.to_csv(ddir / "nih14.csv", index=False)

    pre = pd.concat([kdf.loc[kdf["split"] != "test", ["path", "patient_id"]].assign(source="kermany"),
                     ndf.loc[ndf["split"] == "train", ["path", "patient_id"]].assign(source="nih14")])
    pre.to_csv(ddir / "pretrain.csv", index=False)
    counts = {f"kermany_{s}": int((kdf["split"] == s).sum()) for s in ("train", "val", "test")}
    counts.update({f"nih14_{s}": int((ndf["split"] == s).sum()) for s in ("train", "val", "test")})
    counts["pretrain_images"] = len(pre)
    return {"counts": counts, "nih14_findings": [c for c in n.label_columns if c not in NIH_EXCLUDE]}


# -- backbones -----------------------------------------------------------------------------------------------

def pretrain_backbones(cfg: DemoConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    from chexfound.ssl.config import load_config
    from chexfound.ssl.train import pretrain

    mdir = cfg.out / "models"
    shipped = cfg.weights or (find_shipped_backbone(cfg.preset) if cfg.use_shipped else None)
    run_dir = cfg.out / ("pretrain-check" if shipped else "pretrain")
    budget = cfg.budget(shipped is not None)
    overrides = [f"train.time_budget_s={budget}", f"train.seed={cfg.seed}"]
    if cfg.quick:
        overrides += ["probe.kermany=null"]  # no periodic or final probes: the demo evaluates itself
    ssl_cfg = load_config(cfg.preset, overrides)
    ssl_cfg["data"]["sources"] = [{"path": str(cfg.out / "data" / "pretrain.csv"), "split": None}]
    ssl_cfg["data"]["split"] = None
    echo(f"  pretraining ({cfg.preset}, {budget:.0f} s budget) on {run_dir}"
         + (" as a pipeline check; the shipped checkpoint is the pretrained backbone" if shipped else ""))
    res = pretrain(ssl_cfg, run_dir, device=cfg.device, quiet=False, echo=echo)
    from chexfound.runio import read_jsonl

    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train" and "loss" in r]
    losses = [float(r["loss"]) for r in rows]
    k = max(1, len(losses) // 5)
    loss_first, loss_last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    if shipped:
        model = create_backbone(shipped)
        source = f"shipped checkpoint {shipped}"
    else:
        model = create_backbone(res.exports["ours"])
        source = f"this run's teacher ({res.iterations} iterations)"
    tf = model.info.transform
    save_backbone(model, mdir / "pretrained" / "backbone.safetensors", transform=tf.to_dict(),
                  extra={"source": source})
    torch.manual_seed(cfg.seed + 1)
    # Same architecture, untrained: named so (it is not the pretrained model).
    rnd = VisionTransformer(replace(model.cfg, name=f"{model.cfg.name}_random"))
    save_backbone(rnd, mdir / "random" / "backbone.safetensors", transform=tf.to_dict(),
                  extra={"source": f"random init (seed {cfg.seed + 1})"})
    return {"source": source, "run_dir": str(run_dir), "iterations": res.iterations,
            "loss_first": loss_first, "loss_last": loss_last, "loss_fell": loss_last < loss_first,
            "config": model.cfg.to_dict(), "transform": tf.to_dict(),
            "pretrained_sha256": backbone_sha256(model), "random_sha256": backbone_sha256(rnd)}


# -- features, heads, scores ------------------------------------------------------------------------------


def _glori_trainer(findings: list[str], embed_dim: int, quick: bool, n_blocks: int) -> Any:
    from chexfound.evaluate.trainers import AdaptTrainer

    # A decoder sized to the tiny backbone (the released head uses 768 / 2048 / 8 heads on ViT-L).
    d = max(64, min(256, embed_dim))
    head_kwargs = {"decoder_dim": d, "ffn_dim": 2 * d, "num_heads": 4}
    lrs = (1e-4, 1e-3, 1e-2)
    fit = {"lrs": lrs if quick else lrs + (3e-3,), "epochs": 10 if quick else 30, "patience": 5, "batch_size": 64}
    return AdaptTrainer("glori", findings, n_blocks, embed_dim, head_kwargs=head_kwargs, fit_kwargs=fit)


def linear_head_from_probe(probe: Any, findings: list[str], n_blocks: int, embed_dim: int) -> Any:
    """The fitted logistic probe as a `LinearHead` file for predict/serve: standardisation folded into the
    weights, thresholds and their rules carried over (the head outputs the probe's probabilities)."""
    from chexfound.adapt import LinearHead

    head = LinearHead(findings, n_blocks, embed_dim=embed_dim, avgpool=True)
    w, b = probe.folded()
    with torch.no_grad():
        head.linear.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        head.linear.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    if probe.threshold_choices:
        head.set_thresholds(probe.threshold_choices)
    return head.eval()


def call_rates(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray,
               called: np.ndarray | None = None) -> dict[str, float]:
    """Mean positive calls per test image at the head's thresholds, against the labels' mean (the check a
    clinician makes first: a weak model should say less, not more). Findings without a threshold, or not
    `called` (uninformative: chexfound.stats.informative), are never called, as in predict and serve."""
    lab = ~np.isnan(y).all(axis=1)
    thr = np.where(np.isfinite(thresholds), thresholds, np.inf)
    if called is not None:
        thr = np.where(called, thr, np.inf)
    return {"calls_per_image": float((p[lab] >= thr).sum(axis=1).mean()) if lab.any() else float("nan"),
            "labels_per_image": float(np.nansum(y[lab] == 1, axis=1).mean()) if lab.any() else float("nan"),
            "n_findings": int(y.shape[1])}


def fit_and_score(cfg: DemoConfig, which: str, task: TaskSpec, echo: Callable[[str], None]) -> dict[str, Any]:
    """Cache features of one backbone on one task, train its heads, score test with patient-level CIs."""
    from chexfound.adapt.heads.base import save_head
    from chexfound.evaluate.protocols.common import EvalConfig, score_predictions
    from chexfound.evaluate.protocols.compare import calibration_before_after
    from chexfound.evaluate.trainers import build_cache
    from chexfound.stats import BootstrapConfig, LogisticTrainer
    from chexfound.stats.informative import judge_head

    bb_path = cfg.out / "models" / which / "backbone.safetensors"
    model = create_backbone(bb_path)
    tf = model.info.transform
    n_blocks = min(4, len(model.blocks))
    m = task_manifest(task.manifest, task.findings)
    sp = split_rows(m)
    cache = build_cache(model, [str(p) for p in m.paths()], tf, n_blocks, cfg.out / "cache" / which / task.name,
                        model.info.weights_sha256, batch_size=64, device=cfg.device, progress=True)
    y = m.labels()
    valid = cache.valid
    sp = {k: v[valid[v]] for k, v in sp.items()}
    ecfg = EvalConfig(bootstrap=BootstrapConfig(n_boot=cfg.n_boot, seed=cfg.seed))
    out: dict[str, Any] = {"n_skipped": int((~valid).sum()), "heads": {}}
    pats = m.patients()
    for head_type in task.heads:
        raw = None
        if head_type == "linear":
            x = probe_inputs(cache, n_blocks)
            fitted = LogisticTrainer(findings=task.findings).fit(x, y, sp["train"], sp["val"], seed=cfg.seed)
            p = fitted.predict(x, sp["test"])
            head = linear_head_from_probe(fitted, task.findings, n_blocks, model.embed_dim)
            # The probe has no post-hoc calibrator (logistic regression is fitted on log-loss); its verdict is
            # judged on validation like every adapt head's.
            head.informative = judge_head(y[sp["val"]], fitted.predict(x, sp["val"]), task.findings)
        else:
            fitted = _glori_trainer(task.findings, model.embed_dim, cfg.quick, n_blocks).fit(
                cache, y, sp["train"], sp["val"], seed=cfg.seed)
            p = fitted.predict(cache, sp["test"])
            raw = fitted.predict_uncalibrated(cache, sp["test"])
            head = fitted.head
        res = score_predictions(y[sp["test"]], p, pats[sp["test"]], task.findings, fitted.thresholds,
                                y[sp["train"]], ecfg)
        if raw is not None:  # test calibration before the calibrator (fitted on val), same resamples
            res["calibration_before"] = calibration_before_after(y[sp["test"]], raw, p, pats[sp["test"]],
                                                                 task.findings, ecfg, res)
            np.save(cfg.out / "cache" / which / f"{task.name}-{head_type}-test-probs-uncalibrated.npy", raw)
        head_file = cfg.out / "models" / which / f"{task.name}-{head_type}.safetensors"
        save_head(head, head_file, backbone_sha256=model.info.weights_sha256, backbone_config=model.cfg.to_dict(),
                  transform=tf.to_dict(), extra={"task_name": task.name, "trained_on": str(task.manifest)},
                  results=evaluate_tables(res, "report.json (the demo's test split)"))
        np.save(cfg.out / "cache" / which / f"{task.name}-{head_type}-test-probs.npy", p)
        verdict = head.informative or {}
        called = np.array([f.get("informative") is not False for f in verdict.get("findings", [])] or
                          [True] * len(task.findings)) & (verdict.get("informative") is not False)
        calls = call_rates(y[sp["test"]], p, np.asarray(fitted.thresholds), called)
        out["heads"][head_type] = {"metrics": res, "fit": fitted.info, "file": str(head_file), "calls": calls,
                                   "threshold_rules": list(getattr(head, "threshold_rules", [])),
                                   "informative": {k: verdict.get(k) for k in ("informative", "reason")} | {
                                       "uninformative_findings": [f["finding"] for f in verdict.get("findings", [])
                                                                  if f.get("informative") is False],
                                       "mean_logit_spread": _mean_spread(verdict)},
                                   "calibration": (head.calibration_info or {}).get("methods")}
        ci = res["macro"].get("auroc_ci", [np.nan, np.nan])
        echo(f"  {which:>10} {task.name}-{head_type}: test macro AUROC {res['macro']['auroc']:.3f} "
             f"[{ci[0]:.3f}, {ci[1]:.3f}]; {calls['calls_per_image']:.1f} positive calls per test image "
             f"(labels {calls['labels_per_image']:.1f})")
    return out


def _mean_spread(verdict: dict[str, Any]) -> float | None:
    vals = [f["logit_spread"] for f in verdict.get("findings", []) if f.get("logit_spread") is not None]
    return float(np.mean(vals)) if vals else None


def read_pixel_features(paths: list[Path], size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The raw-pixel baseline's features (`chexfound.stats.pixel_vector`) of each image as read, and which
    images could be read."""
    from chexfound.errors import ChexfoundError
    from chexfound.io import read_image
    from chexfound.stats import pixel_vector

    out = np.zeros((len(paths), size * size), dtype=np.float32)
    ok = np.ones(len(paths), dtype=bool)
    for i, p in enumerate(paths):
        try:
            out[i] = pixel_vector(read_image(p).pixels, size)
        except ChexfoundError:
            ok[i] = False
    return out, ok


def pixel_baseline(cfg: DemoConfig, task: TaskSpec, echo: Callable[[str], None]) -> dict[str, Any]:
    from chexfound.evaluate.protocols.common import EvalConfig, score_predictions
    from chexfound.stats import BootstrapConfig, LogisticTrainer

    m = task_manifest(task.manifest, task.findings)
    sp = split_rows(m)
    x, ok = read_pixel_features(m.paths(), size=32)
    np.save(cfg.out / "cache" / f"pixels-{task.name}.npy", x)
    np.save(cfg.out / "cache" / f"pixels-{task.name}-ok.npy", ok)
    sp = {k: v[ok[v]] for k, v in sp.items()}
    y = m.labels()
    fitted = LogisticTrainer(findings=task.findings).fit(x, y, sp["train"], sp["val"], seed=cfg.seed)
    p = fitted.predict(x, sp["test"])
    np.save(cfg.out / "cache" / f"pixels-{task.name}-test-probs.npy", p)
    res = score_predictions(y[sp["test"]], p, m.patients()[sp["test"]], task.findings, fitted.thresholds,
                            y[sp["train"]], EvalConfig(bootstrap=BootstrapConfig(n_boot=cfg.n_boot, seed=cfg.seed)))
    calls = call_rates(y[sp["test"]], p, fitted.thresholds)
    echo(f"  {'pixels':>10} {task.name}-logistic(32x32): test macro AUROC {res['macro']['auroc']:.3f}; "
         f"{calls['calls_per_image']:.1f} positive calls per test image (labels {calls['labels_per_image']:.1f})")
    return {"metrics": res, "fit": fitted.info, "calls": calls,
            "threshold_rules": [c.to_dict() for c in fitted.threshold_choices]}


# -- the whole run ------------------------------------------------------------------------------------------

def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    from chexfound.demo.report import summarise_and_write

    if not (cfg.data / "kermany" / "labels.csv").is_file() or not (cfg.data / "nih14" / "labels.csv").is_file():
        raise ConfigError(cfg.data, "expected the shared data folder (kermany/ and nih14/ with labels.csv); "
                                    "set --data or CHEXFOUND_DATA")
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "figures").mkdir(exist_ok=True)
    torch.manual_seed(cfg.seed)
    st = StageRunner(cfg.out, echo)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    prev = cfg.out / "stages" / "settings.json"
    if prev.is_file():
        import json

        old = json.loads(prev.read_text())
        if {k: old.get(k) for k in ("quick", "seed", "preset")} != {k: settings[k] for k in ("quick", "seed", "preset")}:
            raise ConfigError(cfg.out, "this folder holds a demo run with other settings (quick/seed/preset); "
                                       "use another --out or delete it")
    else:
        from chexfound.runio import atomic_write_json

        atomic_write_json(prev, settings, indent=1)

    data = st.run("data", "manifests: Kermany (official split), NIH-14 (patient split), pretraining corpus",
                  lambda: prepare_data(cfg))
    ker = TaskSpec("kermany", cfg.out / "data" / "kermany.csv", ["PNEUMONIA"], ("linear",))
    nih = TaskSpec("nih14", cfg.out / "data" / "nih14.csv", list(data["nih14_findings"]), ("linear", "glori"))
    pre = st.run("pretrain", "self-supervised pretraining (DINO + iBOT + KoLeo) and the random-init twin",
                 lambda: pretrain_backbones(cfg, echo))
    results: dict[str, Any] = {"data": data, "pretrain": pre, "models": {}}
    for which in ("pretrained", "random"):
        for task in (ker, nih):
            results["models"][f"{which}/{task.name}"] = st.run(
                f"heads-{which}-{task.name}", f"feature cache + {'/'.join(task.heads)} heads, {which} backbone, {task.name}",
                lambda which=which, task=task: fit_and_score(cfg, which, task, echo))
    for task in (ker, nih):
        results["models"][f"pixels/{task.name}"] = st.run(
            f"pixels-{task.name}", f"raw-pixel baseline (logistic regression on 32x32), {task.name}",
            lambda task=task: pixel_baseline(cfg, task, echo))
    results["comparison"] = st.run(
        "comparison", "paired patient-level bootstrap of the differences (model - reference)",
        lambda: {t.name: compare_task(cfg, t, results["models"], DEMO_PAIRS[t.name]) for t in (ker, nih)})
    results["label_efficiency"] = st.run("label-efficiency", "label-efficiency curve on Kermany",
                                         lambda: label_efficiency(cfg, ker, echo))
    results["localisation"] = st.run("localisation", "GLoRI attention vs NIH expert boxes (test split)",
                                     lambda: localisation(cfg, nih, echo))
    results["heatmaps"] = st.run("heatmaps", "heatmap overlays for a few NIH test images",
                                 lambda: heatmap_overlays(cfg, nih))
    results["timings_s"] = dict(st.timings)
    summarise_and_write(cfg, results, echo)
    return results
