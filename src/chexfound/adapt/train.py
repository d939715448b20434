"""Train a grid of heads (learning rates x weight decays) in one pass over cached features, select the best on
validation, choose per-class thresholds there, and return it.

    result = fit_heads(lambda: GloriHead(findings, n_blocks=4, embed_dim=1024), train_cache, y_train,
                       val_cache, y_val, lrs=DEFAULT_LRS, epochs=20)
    result.head            # best head, eval mode, thresholds set (multilabel/binary)
    result.configs         # per config: lr, weight_decay, best metric, best epoch, its val metrics
    result.history         # one record per (evaluation, config)

Labels: multilabel/binary [N, C] in {0, 1, NaN} (resolve uncertain -1 before, e.g. `Manifest.labels(uncertain=)`),
multiclass [N] class index or NaN, regression [N, K], survival [N, 2] = (time, event).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from chexfound.adapt.grid import HeadGrid, cosine_scale
from chexfound.adapt.heads.base import Features, Head
from chexfound.adapt.losses import build_loss
from chexfound.adapt.metrics import DEFAULT_METRIC, check_metric, choose_thresholds, higher_is_better, task_metrics
from chexfound.adapt.sources import FeatureSource, as_source
from chexfound.runio import resolve_device

log = logging.getLogger(__name__)

# The original's 13-value learning-rate grid.
DEFAULT_LRS: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


@dataclass
class FitResult:
    head: Head
    config: dict[str, Any]
    configs: list[dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list)
    val_predictions: np.ndarray | None = None
    metric: str = ""
    heads: list[Head] = field(default_factory=list)  # every config's head, when asked (`return_all=True`)


def _labelled_rows(task: str, y: np.ndarray) -> np.ndarray:
    y2 = y.reshape(len(y), -1)
    if task == "survival":
        return ~np.isnan(y2).any(1)
    return ~np.isnan(y2).all(1)


def _resolve_uncertain(task: str, labels: np.ndarray, policy: str) -> np.ndarray:
    y = np.array(labels, dtype=np.float32, copy=True)
    if task in ("multilabel", "binary"):
        if policy not in ("nan", "zero", "one"):
            raise ValueError(f"unknown uncertain-label policy {policy!r}; use nan, zero or one")
        y[y == -1] = {"nan": np.nan, "zero": 0.0, "one": 1.0}[policy]
    return y


def _to_device(feats: Features, device: torch.device) -> Features:
    return tuple((p.to(device, non_blocking=True), c.to(device, non_blocking=True)) for p, c in feats)


def _batch_features(src: FeatureSource, idx: np.ndarray, flip: np.ndarray | None, device: torch.device) -> Features:
    feats = _to_device(src.features(idx), device)
    if flip is None or not flip.any():
        return feats
    flipped = _to_device(src.features(idx, flip=True), device)
    sel = torch.as_tensor(flip, device=device)
    return tuple((torch.where(sel[:, None, None], fp, p), torch.where(sel[:, None], fc, c))
                 for (p, c), (fp, fc) in zip(feats, flipped))


def _prefetch(src: FeatureSource, batches: list[np.ndarray], flips: list[np.ndarray | None],
              device: torch.device):
    """Yield each batch's features while the next one is read (memory-map reads overlap head compute)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(_batch_features, src, batches[0], flips[0], device) if batches else None
        for i in range(len(batches)):
            cur = nxt.result()  # type: ignore[union-attr]
            if i + 1 < len(batches):
                nxt = pool.submit(_batch_features, src, batches[i + 1], flips[i + 1], device)
            yield cur


def _predict_grid(grid: HeadGrid, head: Head, src: FeatureSource, idx: np.ndarray, batch_size: int,
                  device: torch.device) -> np.ndarray:
    """Outputs of every config on rows idx, mapped to probabilities/values: [G, len(idx), K]."""
    outs = []
    for s in range(0, len(idx), batch_size):
        b = idx[s : s + batch_size]
        logits, _ = grid.forward(_to_device(src.features(b), device), train=False)
        outs.append(head.probabilities(logits))
    return torch.cat(outs, dim=1).float().cpu().numpy()


def fit_heads(
    make_head: Callable[[], Head],
    train: FeatureSource | Features,
    train_labels: np.ndarray,
    val: FeatureSource | Features | None = None,
    val_labels: np.ndarray | None = None,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = (1e-4,),
    epochs: int = 20,
    batch_size: int = 64,
    loss: str | None = None,
    class_balance: str = "none",
    uncertain: str = "nan",
    asl: dict[str, float] | None = None,
    metric: str | None = None,
    eval_every: int = 1,
    patience: int | None = None,
    warmup_epochs: float = 0.0,
    flip_augment: bool = False,
    threshold_method: str = "f1",
    train_indices: Sequence[int] | None = None,
    val_indices: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    grid_chunk: int | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    return_all: bool = False,
) -> FitResult:
    """Train one head per (lr, weight decay) on the same batches; return the best on `val` by `metric`
    (default: macro AP for classification, R^2 for regression, C-index for survival).

    Early stopping: a config stops updating after `patience` evaluations without improvement; training ends
    when every config has stopped. Without validation data the config with the lowest final training loss
    is taken (logged as a warning) and thresholds stay at 0.5. Uncertain labels (-1) of multilabel/binary
    tasks follow `uncertain`: "nan" (ignored), "zero" or "one". `return_all` also returns every config's head
    (at its best validation state, or final state without validation) in `result.heads`."""
    dev = resolve_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_src = as_source(train)
    val_src = None if val is None else as_source(val)
    template = make_head().to(dev)
    task = template.task
    y_tr = _resolve_uncertain(task, train_labels, uncertain)
    if len(y_tr) != len(train_src):
        raise ValueError(f"{len(y_tr)} training label rows for {len(train_src)} feature rows")
    tr_idx = np.arange(len(train_src)) if train_indices is None else np.asarray(train_indices)
    tr_idx = tr_idx[train_src.valid[tr_idx] & _labelled_rows(task, y_tr[tr_idx])]
    if len(tr_idx) == 0:
        raise ValueError("no labelled training rows with valid features")
    if task == "regression":
        mu = np.nanmean(y_tr[tr_idx].reshape(len(tr_idx), -1), axis=0)
        sd = np.nanstd(y_tr[tr_idx].reshape(len(tr_idx), -1), axis=0)
        template.target_mean.copy_(torch.as_tensor(mu))
        template.target_std.copy_(torch.as_tensor(np.where(sd > 0, sd, 1.0)))
    metric = metric or DEFAULT_METRIC[task]
    check_metric(task, metric)
    sign = 1.0 if higher_is_better(metric) else -1.0
    if flip_augment and not train_src.has_flip:
        raise ValueError("flip_augment needs features of flipped images (build the cache with flip_tta=True)")

    configs = [(float(lr), float(wd)) for wd in weight_decays for lr in lrs]
    grid = HeadGrid(template, [c[0] for c in configs], [c[1] for c in configs], chunk=grid_chunk)
    loss_fn = build_loss(task, loss, y_tr[tr_idx], template.out_dim, class_balance, asl)
    y_train_t = torch.as_tensor(y_tr)
    if task == "regression":
        y_train_t = (y_train_t.reshape(len(y_tr), -1) - template.target_mean.cpu()) / template.target_std.cpu()

    va_idx = y_va = None
    if val_src is not None:
        if val_labels is None:
            raise ValueError("val features given without val labels")
        y_va = _resolve_uncertain(task, val_labels, uncertain)
        va_idx = np.arange(len(val_src)) if val_indices is None else np.asarray(val_indices)
        va_idx = va_idx[val_src.valid[va_idx] & _labelled_rows(task, y_va[va_idx])]
        if len(va_idx) == 0:
            log.warning("no labelled validation rows with valid features; selecting by training loss")
            val_src = None

    steps_per_epoch = math.ceil(len(tr_idx) / batch_size)
    total = steps_per_epoch * epochs
    warmup = int(warmup_epochs * steps_per_epoch)
    best_score = np.full(grid.g, -np.inf)
    best_epoch = np.zeros(grid.g, dtype=int)
    best_metrics: list[dict[str, Any]] = [{} for _ in range(grid.g)]
    bad_evals = np.zeros(grid.g, dtype=int)
    snap = grid.snapshot()
    history: list[dict[str, Any]] = []
    last_loss = np.full(grid.g, np.nan)
    step = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"{template.head_type} x{grid.g}", unit="step")
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(tr_idx)
        sums, n_batches = torch.zeros(grid.g), 0
        batches = [np.sort(order[s : s + batch_size]) for s in range(0, len(order), batch_size)]  # sorted: faster reads
        flip_masks = [rng.random(len(b)) < 0.5 if flip_augment else None for b in batches]
        for b, feats in zip(batches, _prefetch(train_src, batches, flip_masks, dev)):
            targets = y_train_t[torch.as_tensor(b)].to(dev)
            losses = grid.train_step(feats, targets, loss_fn, cosine_scale(step, total, warmup))
            sums += losses.cpu()
            n_batches += 1
            step += 1
            if bar is not None:
                bar.update(1)
        last_loss = (sums / max(n_batches, 1)).numpy()
        epoch_s = time.perf_counter() - t0
        if val_src is None or (epoch % eval_every and epoch != epochs):
            for g, (lr, wd) in enumerate(configs):
                rec = {"epoch": epoch, "config": g, "lr": lr, "weight_decay": wd, "train_loss": float(last_loss[g]),
                       "epoch_seconds": epoch_s}
                history.append(rec)
                if callback:
                    callback(rec)
            continue
        preds = _predict_grid(grid, template, val_src, va_idx, batch_size, dev)
        improved = np.zeros(grid.g, dtype=bool)
        for g, (lr, wd) in enumerate(configs):
            m = task_metrics(task, y_va[va_idx], preds[g], template.findings)
            score = sign * m[metric] if not math.isnan(m[metric]) else -np.inf
            rec = {"epoch": epoch, "config": g, "lr": lr, "weight_decay": wd, "train_loss": float(last_loss[g]),
                   "epoch_seconds": epoch_s, "active": bool(grid.active[g]), **{f"val_{k}": v for k, v in m.items()}}
            history.append(rec)
            if callback:
                callback(rec)
            if not grid.active[g]:
                continue
            if score > best_score[g] or best_epoch[g] == 0:
                improved[g] = True
                best_score[g], best_epoch[g], best_metrics[g] = score, epoch, m
                bad_evals[g] = 0
            else:
                bad_evals[g] += 1
                if patience is not None and bad_evals[g] >= patience:
                    grid.active[g] = False
        grid.update_snapshot(snap, torch.as_tensor(improved, device=dev))
        if not grid.active.any():
            log.info("early stopping: every config stopped improving (epoch %d)", epoch)
            break
    if bar is not None:
        bar.close()

    if val_src is None:
        log.warning("no validation data: taking the config with the lowest final training loss")
        best = int(np.nanargmin(last_loss))
        head = grid.extract(best)
        summary = [{"config": g, "lr": lr, "weight_decay": wd, "train_loss": float(last_loss[g])}
                   for g, (lr, wd) in enumerate(configs)]
        heads = [grid.extract(g).cpu() for g in range(grid.g)] if return_all else []
        return FitResult(head.cpu(), {**summary[best], "epoch": epochs}, summary, history, None, "train_loss", heads)

    best = int(np.argmax(best_score))
    head = grid.extract(best, snap)
    val_pred = predict_rows(head, val_src, np.arange(len(val_src)), batch_size, dev)
    if task in ("multilabel", "binary"):
        thr = choose_thresholds(y_va[va_idx].reshape(len(va_idx), -1), val_pred[va_idx], threshold_method)
        head.thresholds.copy_(torch.as_tensor(thr, dtype=torch.float32))
    summary = [{"config": g, "lr": lr, "weight_decay": wd, "best_epoch": int(best_epoch[g]),
                metric: float(sign * best_score[g]) if np.isfinite(best_score[g]) else math.nan,
                **{f"val_{k}": v for k, v in best_metrics[g].items()}}
               for g, (lr, wd) in enumerate(configs)]
    heads = [grid.extract(g, snap).cpu() for g in range(grid.g)] if return_all else []
    return FitResult(head.cpu(), summary[best], summary, history, val_pred, metric, heads)


@torch.no_grad()
def predict_rows(head: Head, src: FeatureSource, idx: np.ndarray, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """Probabilities/values of one head on rows idx of a source; invalid rows are NaN."""
    head = head.to(device).eval()
    out = np.full((len(idx), head.out_dim), np.nan, dtype=np.float32)
    ok = np.flatnonzero(src.valid[idx])
    for s in range(0, len(ok), batch_size):
        pos = ok[s : s + batch_size]
        logits, _ = head(_to_device(src.features(idx[pos]), device))
        out[pos] = head.probabilities(logits).float().cpu().numpy()
    return out


__all__ = ["DEFAULT_LRS", "FitResult", "fit_heads", "predict_rows"]
