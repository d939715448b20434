"""End-to-end evaluation runs behind `chexfound evaluate`: score a predictions file, or run a protocol on a
dataset task with frozen backbones. Each run writes one report folder (see report.py).
Scoring a predictions file lives in score_run.py; this module runs the task protocols."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from chexfound.data.transform import InputTransform
from chexfound.errors import ChexfoundError
from chexfound.evaluate import figures
from chexfound.models.pooled import PooledFeatures
from chexfound.evaluate.protocols.common import EvalConfig, Splits
from chexfound.evaluate.report import Figure, Report, ci_methods_text, predictions_csv, write_report
from chexfound.evaluate.run_common import classification_figures, provenance
from chexfound.evaluate.tasks import TaskData, load_task
from chexfound.evaluate.trainers import LogisticTrainer
from chexfound.models.format import sha256_file
from chexfound.runio import RunLog, resolve_device, skipped_rows, write_run_config, write_skipped

log = logging.getLogger(__name__)


# --- task protocols -----------------------------------------------------------------------------------------

def load_backbone_spec(spec: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """A backbone file (any layout `chexfound.models.create_backbone` reads) or a registry name (random
    initialisation, for smoke tests and baselines)."""
    from chexfound.errors import ConfigError
    from chexfound.models import create_backbone

    try:
        model = create_backbone(spec, seed=seed)
    except ConfigError as e:
        raise ChexfoundError(f"backbone {spec!r} is neither a file nor a registry name ({e})") from e
    mi = model.info
    if mi.format == "random":
        log.warning("backbone %r is a registry name: using RANDOM weights (seed %d)", spec, seed)
        return model, {"registry_name": spec, "random_init_seed": seed, "weights_sha256": mi.weights_sha256,
                       "config": model.cfg.to_dict()}, spec
    hub = mi.origin.get("hub")
    p = Path(mi.source) if hub else Path(spec)  # an hf:// id: the file in the hub cache it resolved to
    info = {"path": str(p.resolve()), "file_sha256": sha256_file(p) if p.is_file() else None,
            "weights_sha256": mi.weights_sha256, "name": mi.name, "config": mi.config.to_dict(),
            "transform": mi.transform.to_dict(), **({"hub": hub} if hub else {})}
    return model.eval(), info, (hub["repo_id"].split("/")[-1] if hub else p.stem)


def _transform_for(model: torch.nn.Module, info: dict[str, Any], image_size: int | None) -> InputTransform:
    if info.get("transform") and image_size is None:
        return InputTransform.from_dict(info["transform"])
    return InputTransform.for_backbone(model.cfg, size=image_size)


def limit_task(td: TaskData, limit: int | None, seed: int) -> TaskData:
    """Keep at most `limit` images per split (whole patients, seeded) for quick runs."""
    if not limit:
        return td
    df = td.manifest.df
    keep = np.zeros(len(df), dtype=bool)
    rng = np.random.default_rng(seed)
    for s in ("train", "val", "test"):
        idx = np.flatnonzero(df["split"].to_numpy() == s)
        pats = df["patient_id"].astype(str).to_numpy()[idx]
        order = rng.permutation(np.unique(pats))
        counts = {q: int(c) for q, c in zip(*np.unique(pats, return_counts=True))}
        chosen, n = set(), 0
        for q in order:
            if n >= limit:
                break
            chosen.add(q)
            n += counts[q]
        keep[idx[np.isin(pats, list(chosen))]] = True
    td.manifest = td.manifest.subset(keep)
    td.notes.append(f"quick run: at most ~{limit} images per split (whole patients, seed {seed})")
    return td


@dataclass
class TaskOptions:
    protocol: str = "compare"
    heads: Sequence[str] = ("linear",)
    n_blocks: int = 4
    avgpool: bool = True
    image_size: int | None = None
    fractions: Sequence[float] = (0.01, 0.02, 0.05, 0.10, 0.25, 0.50, 1.0)
    seeds: Sequence[int] = (0, 1, 2)
    ood_task: str | None = None
    ood_root: str | None = None
    epochs: int = 20           # adapt heads: epochs of the learning-rate grid
    lrs: Sequence[float] | None = None  # adapt heads: learning-rate grid (default: the original's 13 values)
    decoder_dim: int | None = None  # GLoRI decoder width (default 768)
    image_root: str | None = None
    loc_split: str = "test"
    loc_tolerance: float = 0.0
    gallery: int = 12
    limit: int | None = None
    batch_size: int = 32
    workers: int = 0
    device: str | None = None
    dtype: str = "fp32"
    seed: int = 0
    progress: bool = True
    cfg: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        d = {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in self.__dict__.items() if k != "cfg"}
        d.update(self.cfg.to_dict())
        return d


@dataclass
class _Backbone:
    """One backbone as the protocols see it: the model, its transform, its feature cache (what the adapt
    heads train on) and the pooled features the logistic probe uses."""

    label: str
    model: torch.nn.Module
    info: dict[str, Any]
    transform: InputTransform
    n_blocks: int
    features: PooledFeatures
    cache: Any


def _prepare_backbone(spec: str, paths: Sequence[Path], opts: TaskOptions, out: Path, tag: str = "") -> _Backbone:
    model, info, label = load_backbone_spec(spec, opts.seed)
    return _features_for(model, info, label, paths, opts, out, tag)


def _features_for(model: torch.nn.Module, info: dict[str, Any], label: str, paths: Sequence[Path],
                  opts: TaskOptions, out: Path, tag: str = "") -> _Backbone:
    import hashlib

    from chexfound.evaluate.trainers import build_cache

    tf = _transform_for(model, info, opts.image_size)
    n = min(opts.n_blocks, len(model.blocks))
    sha = info["weights_sha256"]
    # One cache folder per (backbone weights, image list); the cache itself checks transform and n_blocks.
    key = hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:10]
    cache = build_cache(model, paths, tf, n, out / "cache" / f"{tag}{sha[:12]}-{key}", sha,
                        batch_size=opts.batch_size, device=opts.device, dtype=opts.dtype, workers=opts.workers,
                        progress=opts.progress)
    return _Backbone(label, model, info, tf, n, cache.pooled(), cache)


def _trainer(head: str, bb: _Backbone, findings: Sequence[str], kind: str, opts: TaskOptions) -> tuple[Any, Any]:
    """(trainer, feature source) for a head type on a backbone.

    'logistic' is the statistics layer's logistic probe (chexfound.stats) on pooled features (deterministic,
    fast on a CPU); 'linear', 'mlp' and 'glori' are the adapt stage's heads, trained by `fit_heads` on the
    feature cache.
    """
    from chexfound.adapt.heads import HEAD_TYPES, head_class
    from chexfound.evaluate.trainers import AdaptTrainer

    if head == "logistic":
        return LogisticTrainer(findings=findings), bb.features.vectors(bb.n_blocks, opts.avgpool)
    if head not in HEAD_TYPES:
        raise ChexfoundError(f"unknown head {head!r}; choose from logistic, {', '.join(HEAD_TYPES)}")
    fit_kwargs: dict[str, Any] = {"epochs": opts.epochs, "device": opts.device, "batch_size": opts.batch_size}
    if opts.lrs:
        fit_kwargs["lrs"] = list(opts.lrs)
    head_kwargs: dict[str, Any] = {} if head_class(head).needs_tokens else {"avgpool": opts.avgpool}
    if head == "glori" and opts.decoder_dim:
        head_kwargs["decoder_dim"] = opts.decoder_dim
    return AdaptTrainer(head, findings, bb.n_blocks, int(bb.model.embed_dim), kind, head_kwargs, fit_kwargs), bb.cache


def _log_jsonl(out: Path, rec: dict[str, Any]) -> None:
    RunLog(out / "metrics.jsonl").write("result", **rec)


def _skipped(out: Path, errors: list[tuple[int, str, str]]) -> None:
    if errors:
        write_skipped(out / "skipped.csv", skipped_rows("evaluate", errors))
        log.warning("%d image(s) could not be read; listed in %s", len(errors), out / "skipped.csv")


def evaluate_task(task: str, root: str | PathLike[str], backbones: Sequence[str], out: str | PathLike[str],
                  opts: TaskOptions = TaskOptions()) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    td = limit_task(load_task(task, root, seed=opts.seed, image_root=opts.image_root), opts.limit, opts.seed)
    write_run_config(out / "config.yaml", {"task": task, "root": str(root), "backbones": list(backbones),
                                           **opts.to_dict()})
    y = td.labels()
    pats = td.manifest.patients()
    findings = td.findings
    splits_all = Splits.from_labels(td.manifest.df["split"])
    models: dict[str, Any] = {}
    backbone_info: dict[str, Any] = {}
    feats: dict[str, _Backbone] = {}
    errors: list[tuple[int, str, str]] = []
    paths = td.manifest.paths()
    for spec in backbones:
        bb = _prepare_backbone(spec, paths, opts, out)
        if bb.label in feats:
            raise ChexfoundError(f"two backbones are both called {bb.label!r}; rename one of the files")
        errors += bb.features.errors
        feats[bb.label] = bb
        backbone_info[bb.label] = bb.info
        for head in opts.heads:
            models[f"{bb.label}/{head}"] = _trainer(head, bb, findings, td.kind, opts)
    _skipped(out, sorted(set(errors)))
    ok = np.ones(len(y), dtype=bool)
    for bb in feats.values():
        ok &= bb.features.ok
    splits = splits_all.restrict(ok)
    prov = provenance({"task": td.describe(), "manifest_sha256": td.describe()["manifest_sha256"],
                        "backbones": backbone_info,
                        "backbone_sha256": next(iter(backbone_info.values()))["weights_sha256"],
                        "skipped_images": len(set(e[1] for e in errors))})
    ids = td.manifest.df["image_id"].astype(str).tolist() if "image_id" in td.manifest.df.columns else \
        td.manifest.df["path"].astype(str).tolist()
    id_col = "image_id" if "image_id" in td.manifest.df.columns else "path"
    figs: list[Figure] = []
    files: dict[str, bytes] = {}
    tables = []
    proto = opts.protocol
    if proto in ("compare", "localisation"):
        from chexfound.evaluate.protocols.compare import run_compare

        metrics, art = run_compare(models, y, pats, splits, findings, opts.cfg, opts.seed)
        for label, res in metrics["models"].items():
            _log_jsonl(out, {"protocol": "compare", "model": label, "macro": res["macro"]})
        figs += classification_figures(art["y_test"], art["predictions"], findings, metrics,
                                         {k: v["groups"] for k, v in metrics["models"].items() if "groups" in v})
        import pandas as pd

        tables.append(("Models", pd.DataFrame([
            {"model": k, "macro AUROC": v["macro"]["auroc"], "AUROC 95% CI": v["macro"].get("auroc_ci"),
             "macro AP": v["macro"]["ap"], "AP 95% CI": v["macro"].get("ap_ci"), "micro AUROC": v["micro"]["auroc"]}
            for k, v in metrics["models"].items()])))
        before_after = calibration_before_after_table(metrics["models"])
        if before_after is not None:
            cal_ci = ci_methods_text(metrics.get("calibration"))
            tables.append(("Test calibration before and after the post-hoc calibrator (fitted on val; macro, "
                           "patient-level bootstrap 95% CIs" + (f": {cal_ci})" if cal_ci else ")"), before_after))
            for label, raw in art["uncalibrated"].items():
                figs.append(Figure(f"reliability_before_after_{label.replace('/', '_')}.png",
                                   f"Reliability before and after calibration: {label}",
                                   figures.reliability_grid(art["y_test"], {"before": raw,
                                                                            "after": art["predictions"][label]},
                                                            findings, None)))
        from chexfound.stats import DIFFERENCE

        comparison = art["comparison"]
        if comparison.paired:
            tables.append((f"Paired differences ({DIFFERENCE}, patient-level bootstrap)",
                           pd.DataFrame([
                {"comparison": k, "Δ macro AUROC": v.auroc.diff, "CI": list(v.auroc.ci), "p": v.auroc.p_value,
                 "Δ macro AP": v.macro["ap"].diff, "AP CI": list(v.macro["ap"].ci)}
                for k, v in comparison.paired.items()])))
        for label, p in art["predictions"].items():
            files[f"predictions_{label.replace('/', '_')}.csv"] = predictions_csv(
                [ids[i] for i in art["test_idx"]], id_col, p, findings)
        if proto == "localisation":
            first = next(iter(models))
            loc, gallery = _localisation(td, feats, opts, ok, first, art["heads"][first])
            metrics["localisation"] = loc
            figs.append(Figure("localisation.png", "Localisation against expert boxes",
                               figures.localisation_bars(loc["per_finding"]),
                               f"Heatmaps: {loc['heatmap_source']}. Pointing game and attention mass per finding; "
                               "the centre prior is an isotropic Gaussian at the image centre."))
            if gallery:
                figs.append(Figure("gallery.png", "Heatmap gallery", figures.heatmap_gallery(gallery)))
            tables.append(("Localisation (test images with boxes)", _loc_table(loc)))
    elif proto == "label-efficiency":
        from chexfound.evaluate.protocols.label_efficiency import run_label_efficiency

        if len(models) != 1:
            raise ChexfoundError("label-efficiency runs one backbone and one head; got " + ", ".join(models))
        (label, (trainer, source)), = models.items()
        metrics, art = run_label_efficiency(trainer, source, y, pats, splits, findings, opts.fractions, opts.seeds,
                                            opts.cfg)
        metrics["model"] = label
        for r in metrics["runs"]:
            _log_jsonl(out, {"protocol": "label-efficiency", "fraction": r["fraction"], "seed": r["seed"],
                             "macro": r["macro"]})
        figs.append(Figure("label_efficiency.png", "Label efficiency",
                           figures.label_efficiency_curve(metrics["curve"], metrics["runs"]),
                           "Heads trained on a fraction of the training patients; fixed test set."))
        figs += classification_figures(art["y_test"], art["predictions"], findings, metrics)
        import pandas as pd

        tables.append(("Label-efficiency curve", pd.DataFrame([
            {"patients": f"{c['fraction'] * 100:g}%", "images (mean)": round(c["n_images_mean"]), "seeds": c["n_seeds"],
             "macro AUROC": c["auroc_mean"], "± s.d.": c["auroc_std"], "macro AP": c["ap_mean"],
             "AP ± s.d.": c["ap_std"]} for c in metrics["curve"]])))
    elif proto == "ood":
        metrics, figs_o, tables_o = _ood(td, feats, models, y, pats, splits, opts, out)
        figs += figs_o
        tables += tables_o
    else:
        raise ChexfoundError(f"unknown protocol {proto!r} (compare, label-efficiency, localisation, ood)")
    metrics["provenance"] = prov
    metrics["config"] = {"task": task, "root": str(root), "backbones": list(backbones), **opts.to_dict()}
    rep = Report(f"chexfound evaluate: {td.name}, protocol {proto}", metrics, figs, tables,
                 notes=td.notes + [f"backbones: {', '.join(backbone_info)}"], files=files)
    write_report(out, rep)
    return metrics


def calibration_before_after_table(models: dict[str, Any]) -> Any:
    """Per model with a calibrator: macro Brier and ECE (with CIs) before and after, and the AUROC change."""
    import pandas as pd

    rows = []
    for label, res in models.items():
        b = res.get("calibration_before")
        if not b:
            continue
        a = res["macro"]
        rows.append({"model": label, "Brier before": b["macro"].get("brier"), "CI": b["macro"].get("brier_ci"),
                     "Brier after": a.get("brier"), "CI ": a.get("brier_ci"),
                     "ECE before": b["macro"].get("ece"), "ECE CI": b["macro"].get("ece_ci"),
                     "ECE after": a.get("ece"), "ECE CI ": a.get("ece_ci"),
                     "max |Δ AUROC|": b.get("max_abs_auroc_change")})
    return pd.DataFrame(rows) if rows else None


def _loc_table(loc: dict[str, Any]) -> Any:
    import pandas as pd

    rows = []
    for name, d in [("all", loc["overall"]), *loc["per_finding"].items()]:
        rows.append({"finding": name, "items": d["n_items"], "pointing": d.get("pointing"),
                     "pointing CI": d.get("pointing_ci"), "centre-prior pointing": d.get("centre_pointing"),
                     "mass in box": d.get("mass"), "mass CI": d.get("mass_ci"),
                     "centre-prior mass": d.get("centre_mass"), "box area (uniform)": d.get("uniform_mass")})
    return pd.DataFrame(rows)


def _localisation(td: TaskData, feats: dict[str, _Backbone], opts: TaskOptions, ok: np.ndarray, model_label: str,
                  fitted: Any) -> tuple[dict[str, Any], list]:
    from chexfound.evaluate.protocols.localisation import (cls_attention_heatmaps, collect_items,
                                                           head_attention_heatmaps, run_localisation)

    if td.boxes is None:
        raise ChexfoundError(f"task {td.name} has no boxes for the localisation protocol")
    bb = next(iter(feats.values()))
    dev = resolve_device(opts.device)
    model = bb.model.to(dev)
    if getattr(fitted, "has_attention", False):
        fn = head_attention_heatmaps(model, fitted.head.to(dev))
        source = f"{model_label}: the head's cross-attention of each finding's query (heads averaged)"
    else:
        fn = cls_attention_heatmaps(model)
        source = (f"{model_label}: the backbone's last-block CLS attention (class-agnostic; this head has no "
                  "spatial attention)")
    df = td.manifest.df
    sel = ok & ((df["split"] == opts.loc_split).to_numpy() if opts.loc_split != "all" else True)
    idx = np.flatnonzero(sel)
    paths = [td.manifest.paths()[i] for i in idx]
    ids = (df["image_id"] if "image_id" in df.columns else df["path"].map(lambda p: Path(p).name)).astype(str).to_numpy()[idx]
    scores, gallery, errors = collect_items(paths, ids, td.manifest.patients()[idx], td.boxes, td.findings,
                                            bb.transform, fn, batch_size=opts.batch_size, gallery=opts.gallery,
                                            tolerance=opts.loc_tolerance)
    loc = run_localisation(scores, source, opts.loc_tolerance, opts.cfg.bootstrap.n_boot, opts.seed)
    loc["split"] = opts.loc_split
    loc["read_errors"] = errors
    return loc, gallery


def _ood(td: TaskData, feats: dict[str, _Backbone], models: dict[str, Any], y: np.ndarray, pats: np.ndarray,
         splits: Splits, opts: TaskOptions, out: Path) -> tuple[dict[str, Any], list[Figure], list]:
    from chexfound.evaluate.protocols.ood import run_ood

    if not opts.ood_task or not opts.ood_root:
        raise ChexfoundError("--protocol ood needs --ood-task and --ood-root (the test dataset)")
    if len(models) != 1:
        raise ChexfoundError("ood runs one backbone and one head")
    tb = limit_task(load_task(opts.ood_task, opts.ood_root, seed=opts.seed), opts.limit, opts.seed)
    bb = next(iter(feats.values()))
    (mlabel, (trainer, src)), = models.items()
    bt = _features_for(bb.model, bb.info, bb.label, tb.manifest.paths(), opts, out, tag="ood-")
    src_b = bt.cache if src is bb.cache else bt.features.vectors(bb.n_blocks, opts.avgpool)
    test_b = np.flatnonzero((tb.manifest.df["split"] == "test").to_numpy() & bt.features.ok)
    metrics, art = run_ood(trainer, src, y, pats, splits, td.findings, src_b, tb.labels(), tb.manifest.patients(),
                           test_b, tb.findings, opts.cfg, opts.seed, names=(td.name, tb.name))
    metrics["model"] = mlabel
    metrics["test_task"] = tb.describe()
    import pandas as pd

    rows = []
    for f in art["findings"]:
        a, b = metrics["in_distribution"]["per_finding"][f], metrics["per_finding"][f]
        rows.append({"finding": f, f"{td.name} AUROC (ID)": a["auroc"], f"{tb.name} AUROC (OOD)": b["auroc"],
                     "OOD CI": b["auroc_ci"], f"{td.name} AP": a["ap"], f"{tb.name} AP": b["ap"]})
    figs = [Figure("roc.png", f"ROC: {td.name} (ID) vs {tb.name} (OOD)", figures.roc_pr_grid(
        art["y_test"], {f"{tb.name} (OOD)": art["predictions"][f"{tb.name} (OOD)"]}, art["findings"], "roc",
        metrics["per_finding"]))]
    return metrics, figs, [("In-distribution vs out-of-distribution", pd.DataFrame(rows))]
