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
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from chexfound.data.manifest import Manifest, patient_split
from chexfound.data.readers import read_kermany, read_nih14_shared
from chexfound.demo.stages import StageRunner
from chexfound.errors import ConfigError
from chexfound.models import backbone_sha256, create_backbone, save_backbone
from chexfound.models.card_results import evaluate_tables
from chexfound.models.vit import VisionTransformer

log = logging.getLogger(__name__)

NIH_BOX_RENAME = {"Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening"}
# Hernia has 2 positives in the NIH subset: no split can score it (shared data README).
NIH_EXCLUDE = ("Hernia",)


@dataclass
class DemoConfig:
    data: Path
    out: Path
    quick: bool = False
    seed: int = 0
    device: str | None = None
    preset: str = "demo_tiny"
    pretrain_budget_s: float | None = None  # None: by mode (and shipped checkpoint)
    weights: str | Path | None = None       # a pretrained backbone (file or hf:// id); None: look in weights/
    use_shipped: bool = True
    n_boot: int = 1000

    def budget(self, shipped: bool) -> float:
        """Pretraining wall-clock: a pipeline check when a shipped checkpoint is the backbone, else the run."""
        if self.pretrain_budget_s is not None:
            return float(self.pretrain_budget_s)
        if self.quick:
            return 45.0
        return 90.0 if shipped else 420.0


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


def _manifest(path: Path, labels: list[str]) -> Manifest:
    from chexfound.data.manifest import read_manifest

    return read_manifest(path, labels=labels)


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

@dataclass
class TaskSpec:
    name: str            # kermany | nih14
    manifest: Path
    findings: list[str]
    heads: tuple[str, ...]


def _splits(m: Manifest) -> dict[str, np.ndarray]:
    s = m.df["split"].astype(str).to_numpy()
    return {k: np.flatnonzero(s == k) for k in ("train", "val", "test")}


def _glori_trainer(findings: list[str], embed_dim: int, quick: bool, n_blocks: int) -> Any:
    from chexfound.evaluate.trainers import AdaptTrainer

    # A decoder sized to the tiny backbone (the released head uses 768 / 2048 / 8 heads on ViT-L).
    d = max(64, min(256, embed_dim))
    head_kwargs = {"decoder_dim": d, "ffn_dim": 2 * d, "num_heads": 4}
    lrs = (1e-4, 1e-3, 1e-2)
    fit = {"lrs": lrs if quick else lrs + (3e-3,), "epochs": 10 if quick else 30, "patience": 5, "batch_size": 64}
    return AdaptTrainer("glori", findings, n_blocks, embed_dim, head_kwargs=head_kwargs, fit_kwargs=fit)


def probe_inputs(cache: Any, n_blocks: int) -> np.ndarray:
    """The linear probe's input per cached image: CLS of the last n blocks + the mean patch token (DINOv2's
    "avgpool" probe: with LayerScale 1e-5 a random-init ViT's CLS output is nearly constant, and a CLS-only
    probe would make that baseline a strawman). Exactly what a `LinearHead(avgpool=True)` reads."""
    return cache.pooled().vectors(n_blocks, avgpool=True)


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
    m = _manifest(task.manifest, task.findings)
    sp = _splits(m)
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

    m = _manifest(task.manifest, task.findings)
    sp = _splits(m)
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


def pixel_source(cfg: DemoConfig, task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """The pixel features `pixel_baseline` stored for every manifest row, and which rows could be read (an
    unreadable image is a row of zeros that no split may use). A run folder from before the mask was stored:
    the rows that are not all zeros."""
    x = np.load(cfg.out / "cache" / f"pixels-{task.name}.npy")
    ok_file = cfg.out / "cache" / f"pixels-{task.name}-ok.npy"
    ok = np.load(ok_file) if ok_file.is_file() else np.any(x != 0, axis=1)
    return x, np.asarray(ok, dtype=bool)


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

    m = _manifest(task.manifest, task.findings)
    test = _splits(m)["test"]
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

    m = _manifest(task.manifest, task.findings)
    y, pats = m.labels(), m.patients()
    sp = _splits(m)
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

    m = _manifest(task.manifest, task.findings)
    test = _splits(m)["test"]
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
    m = _manifest(task.manifest, task.findings)
    test = _splits(m)["test"][:n_images]
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
