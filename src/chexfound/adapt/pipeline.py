"""The `chexfound adapt` pipeline as a function (the CLI and the demo call it), stage by stage:

1. `_backbone_stage`: the backbone and its identity (sha256, config, input transform), or with `features`
   the identity recorded in what `chexfound embed` wrote (no backbone is loaded or run);
2. `split_manifests` + `task_labels`: manifests (+ patient split when no validation manifest), label arrays;
3. `_feature_sources`: per split, the rows of `features`, or token caches built by the feature engine
   (reused on reruns);
4. `_train_on_features` (`fit_heads`: the lr x wd grid, selection on val) or `_train_end_to_end`
   (`finetune`: full | lora | bitfit, no cache);
5. `_write_outputs`: best head saved with backbone identity and input transform, per-finding val table, grid
   table, val predictions, heatmaps.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import yaml

from chexfound.adapt.heads import GloriHead, Head, LinearHead, MLPHead, save_head
from chexfound.adapt.fit import DEFAULT_LRS
from chexfound.adapt.selection import per_finding
from chexfound.errors import ConfigError, ManifestError
from chexfound.runio import RunLog, atomic_write_bytes, atomic_write_json, resolve_device

log = logging.getLogger(__name__)
VAL_SPLIT_NAMES = ("val", "valid", "validation")


@dataclass
class AdaptOptions:
    train: str
    out: str
    backbone: str | None = None
    config: str | None = None
    val: str | None = None
    val_split: float = 0.2
    labels: list[str] | None = None
    task: str = "multilabel"
    head: str = "glori"
    name: str | None = None
    uncertain: str = "nan"
    lrs: list[float] = field(default_factory=lambda: list(DEFAULT_LRS))
    weight_decays: list[float] = field(default_factory=lambda: [1e-4])
    epochs: int = 20
    batch_size: int = 64
    loss: str | None = None
    class_balance: str = "none"
    metric: str | None = None
    patience: int | None = None
    eval_every: int = 1
    threshold_method: str = "f1"
    n_blocks: int | None = None
    image_size: int | None = None
    flip_tta: bool = False
    flip_augment: bool = False
    cache: str | None = None
    features: str | None = None  # what `chexfound embed` wrote (token cache folder or pooled file): no backbone run
    # GLoRI / probe hyper-parameters
    decoder_dim: int = 768
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    cat_cls: bool = False
    learn_queries: bool = False
    coarse_pools: list[int] = field(default_factory=list)
    avgpool: bool = False
    hidden_dim: int = 1024
    # end to end
    finetune: str | None = None
    backbone_lr: float | None = None
    # outputs
    heatmaps: int = 0
    heatmap_top_k: int = 3
    # common
    device: str = "auto"
    dtype: str = "fp32"
    workers: int = 0
    seed: int = 0
    quiet: bool = False
    strict: bool = False
    grid_chunk: int | None = None
    compile: bool = False  # per-block torch.compile of the backbone while caching features (GPU)
    pack: bool = True      # CPU: oneDNN packed-weight backbone while caching features


def load_backbone_for(opts: AdaptOptions) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """(backbone in eval mode, weights sha256, its recorded transform): `--backbone` is a file or a named
    architecture (random weights, seeded); `config` is the deprecated spelling of the latter."""
    from chexfound.models import create_backbone

    if bool(opts.backbone) == bool(opts.config):
        raise ConfigError(None, "give --backbone FILE or --backbone NAME (a named architecture, random init), "
                                "or --features (what `chexfound embed` wrote)")
    model = create_backbone(str(opts.backbone or opts.config), seed=opts.seed)
    return model.eval(), model.info.weights_sha256, model.info.transform.to_dict()


def _read(path: str, labels: Sequence[str] | None, task: str):
    """Binary label columns are validated by read_manifest; class names, values and times are not 0/1/-1."""
    from chexfound.data.manifest import read_manifest

    if task in ("multilabel", "binary"):
        return read_manifest(path, labels=labels)
    if not labels:
        raise ConfigError(None, f"a {task} task needs --labels (they cannot be inferred)")
    m = read_manifest(path, labels=[])
    missing = [c for c in labels if c not in m.df.columns]
    if missing:
        raise ManifestError(path, f"missing label column(s) {missing}; available: {list(m.df.columns)}")
    m.label_columns = list(labels)
    return m


def split_manifests(opts: AdaptOptions):
    """(train manifest, val manifest) following --val, a `split` column, or a patient split of --train."""
    from chexfound.data.manifest import patient_split

    train = _read(opts.train, opts.labels, opts.task)
    if opts.val:
        return train, _read(opts.val, train.label_columns, opts.task)
    if "split" in train.df.columns:
        split = train.df["split"].astype(str).str.lower()
        val_mask = split.isin(VAL_SPLIT_NAMES).to_numpy()
        train_mask = (split == "train").to_numpy()
        if val_mask.any():
            return train.subset(train_mask), train.subset(val_mask)
        if train_mask.any():
            train = train.subset(train_mask)
    if not 0 < opts.val_split < 1:
        raise ConfigError(None, "no validation manifest or split: set --val-split between 0 and 1")
    names = patient_split(train.patients(), (1 - opts.val_split, opts.val_split), ("train", "val"), seed=opts.seed)
    return train.subset(names == "train"), train.subset(names == "val")


def task_labels(m: Any, task: str, uncertain: str, classes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(label array for fit_heads, finding/class names) from a manifest's label columns."""
    cols = list(m.label_columns)
    if not cols:
        raise ManifestError(m.source, "no label columns (pass --labels)")
    if task == "multilabel":
        return m.labels(uncertain), cols
    if task == "binary":
        if len(cols) != 1:
            raise ManifestError(m.source, f"a binary task takes one label column, got {cols}")
        return m.labels(uncertain), cols
    if task == "multiclass":
        if len(cols) == 1:  # one column of class names/ids
            raw = m.df[cols[0]]
            names = classes or sorted(raw.dropna().astype(str).unique().tolist())
            if len(names) < 2:
                raise ManifestError(m.source, f"column {cols[0]!r} holds {len(names)} class(es) {names}; "
                                              "a multiclass task needs at least two")
            lut = {n: i for i, n in enumerate(names)}
            y = np.array([lut.get(str(v), np.nan) if pd.notna(v) else np.nan for v in raw], dtype=np.float32)
            return y, names
        onehot = m.labels(uncertain)  # one 0/1 column per class
        y = np.where(np.nansum(onehot == 1, 1) == 1, np.nanargmax(np.nan_to_num(onehot, nan=-1), 1), np.nan)
        return y.astype(np.float32), cols
    numeric = m.df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
    if task == "regression":
        return numeric, cols
    if task == "survival":
        if len(cols) != 2:
            raise ManifestError(m.source, f"a survival task takes two label columns (time, event), got {cols}")
        return numeric, ["risk"]
    raise ConfigError(None, f"unknown task {task!r}")


def head_factory(opts: AdaptOptions, findings: list[str], n_blocks: int, embed_dim: int,
                 grid: Sequence[int] | None) -> Callable[[], Head]:
    task = opts.task
    if opts.head == "glori":
        return lambda: GloriHead(findings, n_blocks, task, embed_dim=embed_dim, decoder_dim=opts.decoder_dim,
                                 num_heads=opts.num_heads, ffn_dim=opts.ffn_dim, dropout=opts.dropout,
                                 cat_cls=opts.cat_cls, learn_queries=opts.learn_queries,
                                 coarse_pools=opts.coarse_pools,
                                 # a fixed grid only where pooling needs it: fine-only heads take any resolution
                                 grid=list(grid) if grid is not None and opts.coarse_pools else None)
    if opts.head == "linear":
        return lambda: LinearHead(findings, n_blocks, task, embed_dim=embed_dim, avgpool=opts.avgpool)
    if opts.head == "mlp":
        return lambda: MLPHead(findings, n_blocks, task, embed_dim=embed_dim, avgpool=opts.avgpool,
                               hidden_dim=opts.hidden_dim, dropout=opts.dropout)
    raise ConfigError(None, f"unknown head {opts.head!r}; use glori, linear or mlp")


def _cache_dir(root: Path, sha: str, split: str, paths: list[str], tf: dict, n_blocks: int, flip: bool) -> Path:
    key = hashlib.sha256(json.dumps([paths, tf, n_blocks, flip], sort_keys=True).encode()).hexdigest()[:12]
    return root / sha[:16] / f"{split}-{key}"


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(path, df.to_csv(index=False).encode())


def validate(opts: AdaptOptions) -> None:
    """Reject inconsistent options before any work (as ConfigError: the CLI prints them, exit 2)."""
    from chexfound.adapt.heads.base import TASKS
    from chexfound.adapt.losses import LOSSES
    from chexfound.adapt.selection import TASK_METRICS

    if opts.task not in TASKS:
        raise ConfigError(None, f"unknown task {opts.task!r}; use one of {TASKS}")
    if opts.head not in ("glori", "linear", "mlp"):
        raise ConfigError(None, f"unknown head {opts.head!r}; use glori, linear or mlp")
    if opts.loss and opts.loss not in LOSSES[opts.task]:
        raise ConfigError(None, f"--loss {opts.loss} does not fit a {opts.task} task; use {LOSSES[opts.task]}")
    if opts.metric and opts.metric not in TASK_METRICS[opts.task]:
        raise ConfigError(None, f"--metric {opts.metric} does not exist for a {opts.task} task; "
                                f"use {TASK_METRICS[opts.task]}")
    if not opts.lrs or not opts.weight_decays or any(v <= 0 for v in opts.lrs):
        raise ConfigError(None, "--lrs needs positive values and --wds at least one value")
    if opts.epochs < 1 or opts.batch_size < 1:
        raise ConfigError(None, "--epochs and --batch-size must be at least 1")
    if opts.finetune and opts.flip_augment:
        raise ConfigError(None, "--flip-augment applies to cached features; end-to-end runs augment images")
    if opts.flip_augment and not opts.flip_tta and not opts.features:
        raise ConfigError(None, "--flip-augment needs --flip-tta (features of flipped images in the cache)")
    if opts.uncertain not in ("nan", "zero", "one"):
        raise ConfigError(None, f"--uncertain {opts.uncertain}: use nan, zero or one")
    if opts.features:
        # options of the backbone run that --features replaces: said, not silently dropped
        unused = [flag for flag, on in (("--dtype bf16", opts.dtype != "fp32"), ("--flip-tta", opts.flip_tta),
                                        ("--cache", bool(opts.cache)), ("--compile", opts.compile),
                                        ("--no-pack", not opts.pack), ("--workers", opts.workers > 0)) if on]
        if unused:
            log.warning("%s: %s %s no effect with --features (the backbone does not run here; these features were "
                        "computed by `chexfound embed` with its own options)", opts.features, ", ".join(unused),
                        "has" if len(unused) == 1 else "have")


@dataclass
class _Backbone:
    """What the heads are trained on: the backbone (None when features come from `--features`) and the
    identity every head file records."""

    model: torch.nn.Module | None
    sha256: str
    config: dict[str, Any]
    transform: Any  # InputTransform
    n_blocks: int
    embed_dim: int
    name: str


@dataclass
class _Trained:
    head: Head
    best: dict[str, Any]
    configs: list[dict[str, Any]]
    val_predictions: np.ndarray | None
    metric: str
    val_source: Any  # where heatmaps read attention from (None for end-to-end runs)
    skipped: list[tuple[str, str, str]]


def _backbone_stage(opts: AdaptOptions) -> _Backbone:
    """The backbone and its identity, or (with --features) the identity recorded in the features."""
    from chexfound.data.transform import InputTransform

    if opts.features:
        from chexfound.adapt.sources import open_features

        if opts.finetune:
            raise ConfigError(None, "--finetune trains the backbone: it cannot start from --features")
        src = open_features(opts.features)
        meta = src.meta
        cfg = dict(meta.get("backbone_config") or {})
        if opts.backbone or opts.config:
            model, sha, _ = load_backbone_for(opts)
            if sha != meta.get("backbone_sha256"):
                raise ConfigError(Path(opts.features), f"these features were made by backbone "
                                  f"{str(meta.get('backbone_sha256'))[:12]}..., not by the given one ({sha[:12]}...)")
        tf = InputTransform.from_dict(meta["transform"])
        if opts.image_size and opts.image_size != tf.size:
            raise ConfigError(Path(opts.features), f"--image-size {opts.image_size}: these features were computed "
                                                   f"at {tf.size} px (embed again at that size)")
        n_blocks = opts.n_blocks or src.n_blocks
        if not 1 <= n_blocks <= src.n_blocks:
            raise ConfigError(None, f"--n-blocks {n_blocks}: the features hold {src.n_blocks} block(s)")
        return _Backbone(None, str(meta.get("backbone_sha256", "")), cfg, tf, n_blocks,
                         int(cfg.get("embed_dim") or meta.get("embed_dim")), cfg.get("name") or "features")
    model, sha, recorded_tf = load_backbone_for(opts)
    depth = len(model.blocks)
    n_blocks = opts.n_blocks or min(4, depth)
    if not 1 <= n_blocks <= depth:
        raise ConfigError(None, f"--n-blocks {n_blocks} but the backbone has {depth} blocks")
    tf = InputTransform.from_dict(recorded_tf) if recorded_tf else InputTransform.for_backbone(model.cfg)
    if opts.image_size:
        tf = InputTransform.from_dict({**tf.to_dict(), "size": opts.image_size})
    return _Backbone(model, sha, model.cfg.to_dict(), tf, n_blocks, model.embed_dim, model.info.name or "file")


def _feature_sources(opts: AdaptOptions, bb: _Backbone, splits: dict[str, Any], out: Path,
                     runlog: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One feature source per split: rows of `--features`, or token caches built (or reused) here."""
    from chexfound.adapt.sources import RowSubset, match_rows, open_features
    from chexfound.adapt.token_cache import FeatureCache

    sources: dict[str, Any] = {}
    if opts.features:
        whole = open_features(opts.features)
        if opts.head == "glori" and not getattr(whole, "has_tokens", True):
            raise ConfigError(Path(opts.features), "a GLoRI head attends over patch tokens, and this file holds "
                                                   "pooled features: embed with --tokens DIR and pass that folder")
        if opts.flip_augment and not whole.has_flip:
            raise ConfigError(Path(opts.features), "--flip-augment needs features of flipped images "
                                                   "(embed with --tokens DIR --flip-tta)")
        for split, m in splits.items():
            ids = m.df["image_id"].astype(str).tolist() if "image_id" in m.df.columns else None
            rows = match_rows(whole, [str(p) for p in m.paths()], ids)
            missing = int((rows < 0).sum())
            if missing == len(rows):
                raise ConfigError(Path(opts.features), f"holds none of the {split} images (matched by path, "
                                                       "then image_id): embed the manifests you train on")
            if missing:
                log.warning("%s: %d of %d %s images are not in %s (skipped)", opts.features, missing, len(rows),
                            split, opts.features)
            sources[split] = RowSubset(whole, rows)
            runlog({"event": "features", "split": split, "source": str(opts.features), "images": len(m),
                    "valid": int(sources[split].valid.sum())})
        return sources
    cache_root = Path(opts.cache) if opts.cache else out / "cache"
    for split, m in splits.items():
        paths = [str(p) for p in m.paths()]
        d = _cache_dir(cache_root, bb.sha256, split, paths, bb.transform.to_dict(), bb.n_blocks, opts.flip_tta)
        t0 = time.perf_counter()
        sources[split] = FeatureCache.build(bb.model, m, d, n_blocks=bb.n_blocks, batch_size=opts.batch_size,
                                            device=resolve_device(opts.device), dtype=opts.dtype,
                                            transform=bb.transform, flip_tta=opts.flip_tta, workers=opts.workers,
                                            backbone_sha256=bb.sha256, progress=not opts.quiet, pack=opts.pack,
                                            compile=opts.compile)
        runlog({"event": "cache", "split": split, "dir": str(d), "images": len(m),
                "valid": int(sources[split].valid.sum()), "seconds": round(time.perf_counter() - t0, 3)})
    return sources


def _skipped_rows(split: str, src: Any, m: Any) -> list[tuple[str, str, str]]:
    """Unreadable images, and images a --features collection does not hold."""
    out = [(split, p, r) for _, p, r in getattr(src, "errors", [])]
    rows = getattr(src, "rows", None)
    if rows is not None:
        paths = [str(p) for p in m.paths()]
        out += [(split, paths[k], "not in --features") for k in np.flatnonzero(rows < 0)]
    return out


def _train_on_features(opts: AdaptOptions, make: Callable[[], Head], sources: dict[str, Any], y_tr: np.ndarray,
                       y_va: np.ndarray, splits: dict[str, Any], runlog: Callable[[dict[str, Any]], None]) -> _Trained:
    from chexfound.adapt.fit import FitSettings, fit_heads

    st = FitSettings(lrs=opts.lrs, weight_decays=opts.weight_decays, epochs=opts.epochs, batch_size=opts.batch_size,
                     loss=opts.loss, class_balance=opts.class_balance, metric=opts.metric, eval_every=opts.eval_every,
                     patience=opts.patience, flip_augment=opts.flip_augment, threshold_method=opts.threshold_method,
                     device=resolve_device(opts.device), seed=opts.seed, grid_chunk=opts.grid_chunk)
    res = fit_heads(make, sources["train"], y_tr, sources["val"], y_va, st, callback=runlog, progress=not opts.quiet)
    skipped = [row for split in ("train", "val") for row in _skipped_rows(split, sources[split], splits[split])]
    return _Trained(res.head, res.config, res.configs, res.val_predictions, res.metric, sources["val"], skipped)


def _train_end_to_end(opts: AdaptOptions, make: Callable[[], Head], bb: _Backbone, y_tr: np.ndarray,
                      y_va: np.ndarray, splits: dict[str, Any], out: Path, name: str,
                      runlog: Callable[[dict[str, Any]], None]) -> tuple[_Trained, _Backbone]:
    from chexfound.adapt.finetune import FinetuneSettings, finetune
    from chexfound.models import backbone_sha256, save_backbone

    if len(opts.lrs) > 1 or len(opts.weight_decays) > 1:
        log.warning("end-to-end training runs one configuration: lr %g, weight decay %g (the first values)",
                    opts.lrs[0], opts.weight_decays[0])
    st = FinetuneSettings(mode=opts.finetune, lr=opts.lrs[0], backbone_lr=opts.backbone_lr,  # type: ignore[arg-type]
                          weight_decay=opts.weight_decays[0], epochs=opts.epochs, batch_size=opts.batch_size,
                          loss=opts.loss, class_balance=opts.class_balance, metric=opts.metric,
                          patience=opts.patience, threshold_method=opts.threshold_method,
                          device=resolve_device(opts.device), dtype=opts.dtype, workers=opts.workers, seed=opts.seed)
    model, res = finetune(copy.deepcopy(bb.model), make, splits["train"].paths(), y_tr, splits["val"].paths(), y_va,
                          st, transform=bb.transform, callback=runlog)
    save_backbone(model, out / f"{name}.backbone.safetensors", transform=bb.transform.to_dict(),
                  extra={"finetuned_from": bb.sha256, "finetune": opts.finetune})
    adapted = _Backbone(model, backbone_sha256(model), model.cfg.to_dict(), bb.transform, bb.n_blocks, bb.embed_dim,
                        bb.name)
    trained = _Trained(res.head, res.config, [res.config], res.val_predictions, res.metric, None,
                       [("train", p, r) for _, p, r in res.errors])
    return trained, adapted


def run_adapt(opts: AdaptOptions) -> dict[str, Any]:
    """The `chexfound adapt` pipeline: backbone (or --features) -> splits and labels -> features per split ->
    grid training (or end to end) -> head file, tables, predictions, heatmaps. Returns the summary."""
    validate(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    # Several heads may share one folder (and its cache): per-head files are prefixed by the head's name.
    name = opts.name or opts.head
    atomic_write_bytes(out / f"{name}.config.yaml", yaml.safe_dump(asdict(opts), sort_keys=False).encode())
    run_log = RunLog(out / "metrics.jsonl")

    def runlog(rec: dict[str, Any]) -> None:
        # one callback for this driver's milestones ("event" rows) and the trainers' per-epoch rows
        run_log.write("event" if "event" in rec else "epoch", run=name, **rec)

    runlog({"event": "start", "head_type": opts.head, "task": opts.task})

    bb = _backbone_stage(opts)
    train_m, val_m = split_manifests(opts)
    y_tr, findings = task_labels(train_m, opts.task, opts.uncertain)
    y_va, _ = task_labels(val_m, opts.task, opts.uncertain, classes=findings if opts.task == "multiclass" else None)
    if len(train_m) == 0 or len(val_m) == 0:
        raise ManifestError(Path(opts.train), f"empty split: {len(train_m)} train / {len(val_m)} val images")
    splits = {"train": train_m, "val": val_m}
    runlog({"event": "data", "train_images": len(train_m), "val_images": len(val_m), "findings": findings})
    if not opts.quiet:
        print(f"adapt: {opts.head} head, {opts.task}, {len(findings)} output(s); {len(train_m)} train / "
              f"{len(val_m)} val images; backbone {bb.name} ({bb.sha256[:12]}), {bb.n_blocks} blocks, "
              f"{bb.transform.size}px, device {resolve_device(opts.device)}"
              + (f", features from {opts.features}" if opts.features else ""))
    p = int(bb.config.get("patch_size", 16))
    make = head_factory(opts, findings, bb.n_blocks, bb.embed_dim, (bb.transform.size // p, bb.transform.size // p))
    if opts.finetune:
        trained, bb = _train_end_to_end(opts, make, bb, y_tr, y_va, splits, out, name, runlog)
    else:
        sources = _feature_sources(opts, bb, splits, out, runlog)
        trained = _train_on_features(opts, make, sources, y_tr, y_va, splits, runlog)
    return _write_outputs(opts, name, out, bb, trained, findings, train_m, val_m, y_va, runlog)


def _write_outputs(opts: AdaptOptions, name: str, out: Path, bb: _Backbone, tr: _Trained, findings: list[str],
                   train_m: Any, val_m: Any, y_va: np.ndarray,
                   runlog: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Head file (with backbone identity and transform), grid / per-finding tables, val predictions, heatmaps."""
    head = tr.head
    if head.threshold_rules:  # how every threshold was chosen, in the run log and on the terminal
        runlog({"event": "thresholds", "findings": head.threshold_rules})
        for r in head.threshold_rules:
            for w in r.get("warnings", []):
                log.warning("threshold for %s: %s", r["finding"], w)
    head_path = out / f"{name}.safetensors"
    extra = {"selection": {"metric": tr.metric, **tr.best}, "label_columns": list(train_m.label_columns),
             "uncertain": opts.uncertain, "train_manifest": str(opts.train), "finetune": opts.finetune}
    if opts.features:
        extra["features"] = str(opts.features)
    save_head(head, head_path, backbone_sha256=bb.sha256, backbone_config=bb.config, transform=bb.transform.to_dict(),
              extra=extra)
    files = {"head": head_path, "grid": out / f"{name}.grid.csv", "summary": out / f"{name}.metrics.json",
             "val_predictions": out / f"{name}.val_predictions.csv",
             "val_per_finding": out / f"{name}.val_per_finding.csv", "log": out / "metrics.jsonl"}
    _write_csv(pd.DataFrame(tr.configs), files["grid"])

    summary: dict[str, Any] = {"head": str(head_path), "best": tr.best, "metric": tr.metric,
                               "backbone_sha256": bb.sha256, "train_images": len(train_m), "val_images": len(val_m),
                               "skipped": len(tr.skipped), "files": {k: str(v) for k, v in files.items()}}
    if tr.val_predictions is not None:
        cols = findings if head.out_dim == len(findings) else ["risk"]
        pred_df = pd.DataFrame(tr.val_predictions, columns=cols)
        pred_df.insert(0, "path", [str(p) for p in val_m.paths()])
        _write_csv(pred_df, files["val_predictions"])
        if opts.task in ("multilabel", "binary", "multiclass"):
            y_table = y_va.reshape(len(y_va), -1) if opts.task != "multiclass" else _onehot(y_va, len(findings))
            rows = per_finding(y_table, tr.val_predictions, findings)
            rules = head.threshold_rules or [{} for _ in rows]
            for r, t, rule in zip(rows, head.thresholds.tolist(), rules):
                r["threshold"] = t
                r["threshold_rule"] = rule.get("rule", "")
                r["threshold_reason"] = rule.get("reason", "")
            table = pd.DataFrame(rows)
            _write_csv(table, files["val_per_finding"])
            summary["per_finding"] = rows
            if not opts.quiet:
                print(_format_table(table))
    if tr.skipped:
        _write_csv(pd.DataFrame(tr.skipped, columns=["split", "path", "reason"]), out / "skipped.csv")
        log.warning("%d unreadable image(s) skipped; listed in %s", len(tr.skipped), out / "skipped.csv")

    if opts.heatmaps and tr.val_source is not None and getattr(tr.val_source, "has_tokens", True):
        summary["heatmaps"] = [str(p) for p in _heatmaps(head, tr.val_source, bb.transform, out / "heatmaps" / name,
                                                         opts)]
    elif opts.heatmaps:
        log.warning("heatmaps are drawn from patch-token features; skipped for end-to-end runs and pooled features")
    runlog({"event": "done", **{k: v for k, v in summary.items() if k not in ("per_finding",)}})
    atomic_write_json(files["summary"], summary, indent=1)
    if not opts.quiet:
        print(f"best: {_short(tr.best)}\nsaved {head_path}")
    summary["exit_code"] = 1 if (opts.strict and tr.skipped) else 0
    return summary


def _onehot(y: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(y), k), np.nan, dtype=np.float32)
    ok = ~np.isnan(y)
    out[ok] = np.eye(k, dtype=np.float32)[y[ok].astype(int)]
    return out


def _heatmaps(head: Head, cache: Any, tf: Any, out_dir: Path, opts: AdaptOptions) -> list[Path]:
    from chexfound.adapt.heatmap import save_heatmaps
    from chexfound.adapt.inference import predict
    from chexfound.io import read_image

    if not head.has_attention:
        log.warning("--heatmaps: a %s head has no attention maps; use --head glori", head.head_type)
        return []
    rows = np.flatnonzero(cache.valid)[: opts.heatmaps]
    probs, attn = predict(head, cache, indices=rows, return_attention=True, device="cpu")
    written: list[Path] = []
    for k, row in enumerate(rows):
        pixels = read_image(cache.paths[row]).pixels
        stem = Path(cache.ids[row]).stem
        written += save_heatmaps(attn[k], probs[k].tolist(), head.findings, pixels, tf, out_dir, stem,
                                 top_k=opts.heatmap_top_k, grid=cache.grid, original_space=True)
    return written


def _short(best: dict[str, Any]) -> str:
    keep = {k: v for k, v in best.items() if not k.startswith("val_") or k in ("val_macro_auroc",)}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items())


def _format_table(df: pd.DataFrame) -> str:
    lines = [f"{'finding':<28} {'n_pos':>6} {'n_neg':>6} {'AUROC':>7} {'AP':>7} {'thr':>6}  threshold rule"]
    for r in df.itertuples():
        lines.append(f"{str(r.finding)[:28]:<28} {r.n_pos:>6d} {r.n_neg:>6d} {r.auroc:>7.3f} {r.ap:>7.3f} "
                     f"{r.threshold:>6.3f}  {getattr(r, 'threshold_rule', '')}")
    macro = df[["auroc", "ap"]].mean(skipna=True)
    lines.append(f"{'macro (scored findings)':<28} {'':>6} {'':>6} {macro['auroc']:>7.3f} {macro['ap']:>7.3f}")
    return "\n".join(lines)
