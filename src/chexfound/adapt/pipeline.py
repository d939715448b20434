"""The `chexfound adapt` pipeline as a function (the CLI and the demo call it), stage by stage:

1. `_backbone_stage`: the backbone and its identity (sha256, config, input transform), or with `features`
   the identity recorded in what `chexfound embed` wrote (no backbone is loaded or run);
2. `split_manifests` + `task_labels` (adapt/labels.py): manifests (+ patient split when no validation
   manifest), label arrays;
3. `_feature_sources`: per split, the rows of `features`, or token caches built by the feature engine
   (reused on reruns);
4. `_train_on_features` (`fit_heads`: the lr x wd grid, selection on val) or `_train_end_to_end`
   (`finetune`: full | lora | bitfit, no cache);
5. `write_outputs` (adapt/outputs.py): best head saved with backbone identity and input transform,
   per-finding val table, grid table, val predictions, heatmaps.

The options and their validation live in adapt/options.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from chexfound.adapt.heads import Head, head_class
from chexfound.adapt.labels import split_manifests, task_labels
from chexfound.adapt.options import AdaptOptions, head_factory, validate
from chexfound.adapt.outputs import RunBackbone, TrainedHead, write_outputs
from chexfound.errors import ConfigError, ManifestError
from chexfound.runio import RunLog, resolve_device, write_run_config

__all__ = ["AdaptOptions", "load_backbone_for", "run_adapt", "split_manifests", "task_labels", "validate"]

log = logging.getLogger(__name__)


def load_backbone_for(opts: AdaptOptions) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """(backbone in eval mode, weights sha256, its recorded transform): `--backbone` is a file or a named
    architecture (random weights, seeded); `config` is the deprecated spelling of the latter."""
    from chexfound.models import create_backbone

    if bool(opts.backbone) == bool(opts.config):
        raise ConfigError(None, "give --backbone FILE or --backbone NAME (a named architecture, random init), "
                                "or --features (what `chexfound embed` wrote)")
    model = create_backbone(str(opts.backbone or opts.config), seed=opts.seed)
    return model.eval(), model.info.weights_sha256, model.info.transform.to_dict()


def _cache_dir(root: Path, sha: str, split: str, paths: list[str], tf: dict, n_blocks: int, flip: bool) -> Path:
    key = hashlib.sha256(json.dumps([paths, tf, n_blocks, flip], sort_keys=True).encode()).hexdigest()[:12]
    return root / sha[:16] / f"{split}-{key}"


def _backbone_stage(opts: AdaptOptions) -> RunBackbone:
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
        return RunBackbone(None, str(meta.get("backbone_sha256", "")), cfg, tf, n_blocks,
                         int(cfg.get("embed_dim") or meta.get("embed_dim")), cfg.get("name") or "features")
    model, sha, recorded_tf = load_backbone_for(opts)
    depth = len(model.blocks)
    n_blocks = opts.n_blocks or min(4, depth)
    if not 1 <= n_blocks <= depth:
        raise ConfigError(None, f"--n-blocks {n_blocks} but the backbone has {depth} blocks")
    tf = InputTransform.from_dict(recorded_tf) if recorded_tf else InputTransform.for_backbone(model.cfg)
    if opts.image_size:
        tf = InputTransform.from_dict({**tf.to_dict(), "size": opts.image_size})
    return RunBackbone(model, sha, model.cfg.to_dict(), tf, n_blocks, model.embed_dim, model.info.name or "file")


def _feature_sources(opts: AdaptOptions, bb: RunBackbone, splits: dict[str, Any], out: Path,
                     runlog: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One feature source per split: rows of `--features`, or token caches built (or reused) here."""
    from chexfound.adapt.sources import RowSubset, match_rows, open_features
    from chexfound.adapt.token_cache import FeatureCache

    sources: dict[str, Any] = {}
    if opts.features:
        whole = open_features(opts.features)
        if head_class(opts.head).needs_tokens and not getattr(whole, "has_tokens", True):
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
                       y_va: np.ndarray, splits: dict[str, Any],
                       runlog: Callable[[dict[str, Any]], None]) -> TrainedHead:
    from chexfound.adapt.fit import FitSettings, fit_heads

    st = FitSettings(lrs=opts.lrs, weight_decays=opts.weight_decays, epochs=opts.epochs, batch_size=opts.batch_size,
                     loss=opts.loss, class_balance=opts.class_balance, metric=opts.metric, eval_every=opts.eval_every,
                     patience=opts.patience, flip_augment=opts.flip_augment, threshold_method=opts.threshold_method,
                     device=resolve_device(opts.device), seed=opts.seed, grid_chunk=opts.grid_chunk)
    res = fit_heads(make, sources["train"], y_tr, sources["val"], y_va, st, callback=runlog, progress=not opts.quiet)
    skipped = [row for split in ("train", "val") for row in _skipped_rows(split, sources[split], splits[split])]
    return TrainedHead(res.head, res.config, res.configs, res.val_predictions, res.metric, sources["val"], skipped)


def _train_end_to_end(opts: AdaptOptions, make: Callable[[], Head], bb: RunBackbone, y_tr: np.ndarray,
                      y_va: np.ndarray, splits: dict[str, Any], out: Path, name: str,
                      runlog: Callable[[dict[str, Any]], None]) -> tuple[TrainedHead, RunBackbone]:
    from chexfound.adapt.finetune import FinetuneSettings, finetune
    from chexfound.models import backbone_sha256, info_of, save_backbone

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
    if res.adapter_tensors is not None:  # LoRA / BitFit: the adapter, tied to its base (megabytes, not a copy)
        from chexfound.adapt.adapter import Adapter, save_adapter

        adapter = Adapter(opts.finetune, res.adapter_tensors, bb.sha256,  # type: ignore[arg-type]
                          backbone_sha256(model), bb.config, res.lora, bb.transform.to_dict())
        save_adapter(adapter, out / f"{name}.adapter.safetensors")
    # A random-init base (a named architecture) cannot be given back to `predict --backbone`: keep the merged one.
    random_base = bb.model is not None and info_of(bb.model).format == "random"
    if res.adapter_tensors is None or opts.save_merged or random_base:
        save_backbone(model, out / f"{name}.backbone.safetensors", transform=bb.transform.to_dict(),
                      extra={"finetuned_from": bb.sha256, "finetune": opts.finetune})
    adapted = RunBackbone(model, backbone_sha256(model), model.cfg.to_dict(), bb.transform, bb.n_blocks, bb.embed_dim,
                        bb.name)
    trained = TrainedHead(res.head, res.config, [res.config], res.val_predictions, res.metric, None,
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
    write_run_config(out / f"{name}.config.yaml", asdict(opts))
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
    return write_outputs(opts, name, out, bb, trained, findings, train_m, val_m, y_va, runlog)
