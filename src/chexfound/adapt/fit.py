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
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from chexfound.adapt.grid import HeadGrid, cosine_scale
from chexfound.adapt.heads.base import Features, Head
from chexfound.adapt.losses import build_loss
from chexfound.adapt.selection import DEFAULT_METRIC, check_metric, higher_is_better, task_metrics
from chexfound.adapt.sources import FeatureSource, as_source
from chexfound.data.uncertain import resolve_uncertain
from chexfound.runio import resolve_device
from chexfound.adapt.calibrate import calibrate_head
from chexfound.stats.thresholds import label_prevalence

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
    if task in ("multilabel", "binary"):
        return resolve_uncertain(labels, policy)
    return np.array(labels, dtype=np.float32, copy=True)


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


@dataclass
class FitSettings:
    """Everything `fit_heads` can be told (the CLI's `chexfound adapt` training options map onto these)."""

    lrs: Sequence[float] = DEFAULT_LRS
    weight_decays: Sequence[float] = (1e-4,)
    epochs: int = 20
    batch_size: int = 64
    loss: str | None = None               # default by task: bce / ce / mse / cox
    class_balance: str = "none"           # none | pos_weight | effective
    uncertain: str = "nan"                # -1 labels: nan (ignored) | zero | one
    asl: dict[str, float] | None = None
    metric: str | None = None             # selection metric (default by task)
    eval_every: int = 1
    patience: int | None = None           # evaluations without improvement before a config stops
    warmup_epochs: float = 0.0
    flip_augment: bool = False
    threshold_method: str = "f1"          # f1 | youden
    train_indices: Sequence[int] | None = None
    val_indices: Sequence[int] | None = None
    device: str | torch.device | None = None
    seed: int = 0
    grid_chunk: int | None = None         # configs per vmapped forward (lower to save memory)
    return_all: bool = False              # also return every config's head


@dataclass
class _Data:
    """The labelled rows a fit runs on."""

    task: str
    train: FeatureSource
    train_rows: np.ndarray
    train_labels: np.ndarray          # uncertain labels resolved
    train_targets: torch.Tensor       # what the loss sees (regression: standardised)
    val: FeatureSource | None
    val_rows: np.ndarray | None
    val_labels: np.ndarray | None


class _Selection:
    """Per config: best validation score, its epoch and metrics, early stopping, the best-state snapshot."""

    def __init__(self, grid: HeadGrid, metric: str, patience: int | None) -> None:
        self.grid, self.metric, self.patience = grid, metric, patience
        self.sign = 1.0 if higher_is_better(metric) else -1.0
        self.score = np.full(grid.g, -np.inf)
        self.epoch = np.zeros(grid.g, dtype=int)
        self.metrics: list[dict[str, Any]] = [{} for _ in range(grid.g)]
        self.bad = np.zeros(grid.g, dtype=int)
        self.snapshot = grid.snapshot()

    def update(self, epoch: int, per_config: list[dict[str, Any]], device: torch.device) -> None:
        improved = np.zeros(self.grid.g, dtype=bool)
        for g, m in enumerate(per_config):
            if not self.grid.active[g]:
                continue
            score = self.sign * m[self.metric] if not math.isnan(m[self.metric]) else -np.inf
            if score > self.score[g] or self.epoch[g] == 0:
                improved[g] = True
                self.score[g], self.epoch[g], self.metrics[g] = score, epoch, m
                self.bad[g] = 0
            else:
                self.bad[g] += 1
                if self.patience is not None and self.bad[g] >= self.patience:
                    self.grid.active[g] = False
        self.grid.update_snapshot(self.snapshot, torch.as_tensor(improved, device=device))

    def best_value(self, g: int) -> float:
        return float(self.sign * self.score[g]) if np.isfinite(self.score[g]) else math.nan


def _prepare_data(template: Head, train: FeatureSource, train_labels: np.ndarray, val: FeatureSource | None,
                  val_labels: np.ndarray | None, st: FitSettings) -> _Data:
    """Uncertain labels resolved, rows with features and labels selected, regression targets standardised
    (the template head keeps the training mean/std)."""
    task = template.task
    y_tr = _resolve_uncertain(task, train_labels, st.uncertain)
    if len(y_tr) != len(train):
        raise ValueError(f"{len(y_tr)} training label rows for {len(train)} feature rows")
    tr_idx = np.arange(len(train)) if st.train_indices is None else np.asarray(st.train_indices)
    tr_idx = tr_idx[train.valid[tr_idx] & _labelled_rows(task, y_tr[tr_idx])]
    if len(tr_idx) == 0:
        raise ValueError("no labelled training rows with valid features")
    if task == "regression":
        mu = np.nanmean(y_tr[tr_idx].reshape(len(tr_idx), -1), axis=0)
        sd = np.nanstd(y_tr[tr_idx].reshape(len(tr_idx), -1), axis=0)
        template.target_mean.copy_(torch.as_tensor(mu))
        template.target_std.copy_(torch.as_tensor(np.where(sd > 0, sd, 1.0)))
    targets = torch.as_tensor(y_tr)
    if task == "regression":
        targets = (targets.reshape(len(y_tr), -1) - template.target_mean.cpu()) / template.target_std.cpu()
    va_idx = y_va = None
    if val is not None:
        if val_labels is None:
            raise ValueError("val features given without val labels")
        y_va = _resolve_uncertain(task, val_labels, st.uncertain)
        va_idx = np.arange(len(val)) if st.val_indices is None else np.asarray(st.val_indices)
        va_idx = va_idx[val.valid[va_idx] & _labelled_rows(task, y_va[va_idx])]
        if len(va_idx) == 0:
            log.warning("no labelled validation rows with valid features; selecting by training loss")
            val = None
    return _Data(task, train, tr_idx, y_tr, targets, val, va_idx, y_va)


def _train_epoch(grid: HeadGrid, data: _Data, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 st: FitSettings, rng: np.random.Generator, step: int, total: int, warmup: int,
                 dev: torch.device, bar: Any) -> tuple[np.ndarray, int]:
    """One pass over the training rows for every config; returns (mean loss per config, step counter)."""
    order = rng.permutation(data.train_rows)
    # Rows sorted within a batch: memory-mapped caches read fastest in row order.
    batches = [np.sort(order[s : s + st.batch_size]) for s in range(0, len(order), st.batch_size)]
    flips = [rng.random(len(b)) < 0.5 if st.flip_augment else None for b in batches]
    sums, n = torch.zeros(grid.g), 0
    for b, feats in zip(batches, _prefetch(data.train, batches, flips, dev)):
        targets = data.train_targets[torch.as_tensor(b)].to(dev)
        sums += grid.train_step(feats, targets, loss_fn, cosine_scale(step, total, warmup)).cpu()
        n += 1
        step += 1
        if bar is not None:
            bar.update(1)
    return (sums / max(n, 1)).numpy(), step


def fit_heads(
    make_head: Callable[[], Head],
    train: FeatureSource | Features,
    train_labels: np.ndarray,
    val: FeatureSource | Features | None = None,
    val_labels: np.ndarray | None = None,
    settings: FitSettings | None = None,
    *,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    **overrides: Any,
) -> FitResult:
    """Train one head per (lr, weight decay) on the same batches; return the best on `val` by the metric
    (default: macro AP for classification, R^2 for regression, C-index for survival).

    Settings come as a `FitSettings` and/or as its field names (`fit_heads(..., lrs=[1e-3], epochs=5)`).
    Early stopping: a config stops updating after `patience` evaluations without improvement; training ends
    when every config has stopped. Without validation data the config with the lowest final training loss
    is taken (logged as a warning) and thresholds stay at 0.5. Thresholds follow `chexfound.stats.thresholds`
    (`threshold_method` where validation evidence is strong, else the training prevalence); each finding's rule
    and evidence are on `result.head.threshold_rules`. Uncertain labels (-1) of multilabel/binary
    tasks follow `uncertain`: "nan" (ignored), "zero" or "one". `return_all` also returns every config's head
    (at its best validation state, or final state without validation) in `result.heads`."""
    unknown = set(overrides) - {f.name for f in fields(FitSettings)}
    if unknown:
        raise TypeError(f"fit_heads() got unknown settings {sorted(unknown)}")
    st = replace(settings or FitSettings(), **overrides)
    dev = resolve_device(st.device)
    torch.manual_seed(st.seed)
    rng = np.random.default_rng(st.seed)
    template = make_head().to(dev)
    data = _prepare_data(template, as_source(train), train_labels, None if val is None else as_source(val),
                         val_labels, st)
    metric = st.metric or DEFAULT_METRIC[data.task]
    check_metric(data.task, metric)
    if st.flip_augment and not data.train.has_flip:
        raise ValueError("flip_augment needs features of flipped images (build the cache with flip_tta=True)")

    configs = [(float(lr), float(wd)) for wd in st.weight_decays for lr in st.lrs]
    grid = HeadGrid(template, [c[0] for c in configs], [c[1] for c in configs], chunk=st.grid_chunk)
    loss_fn = build_loss(data.task, st.loss, data.train_labels[data.train_rows], template.out_dim, st.class_balance,
                         st.asl)
    steps_per_epoch = math.ceil(len(data.train_rows) / st.batch_size)
    total = steps_per_epoch * st.epochs
    warmup = int(st.warmup_epochs * steps_per_epoch)
    sel = _Selection(grid, metric, st.patience)
    history: list[dict[str, Any]] = []
    last_loss = np.full(grid.g, np.nan)
    step = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"{template.head_type} x{grid.g}", unit="step")

    def log_record(rec: dict[str, Any]) -> None:
        history.append(rec)
        if callback:
            callback(rec)

    for epoch in range(1, st.epochs + 1):
        t0 = time.perf_counter()
        last_loss, step = _train_epoch(grid, data, loss_fn, st, rng, step, total, warmup, dev, bar)
        epoch_s = time.perf_counter() - t0
        if data.val is None or (epoch % st.eval_every and epoch != st.epochs):
            for g, (lr, wd) in enumerate(configs):
                log_record({"epoch": epoch, "config": g, "lr": lr, "weight_decay": wd,
                            "train_loss": float(last_loss[g]), "epoch_seconds": epoch_s})
            continue
        assert data.val_rows is not None and data.val_labels is not None
        preds = _predict_grid(grid, template, data.val, data.val_rows, st.batch_size, dev)
        per_config = [task_metrics(data.task, data.val_labels[data.val_rows], preds[g], template.findings)
                      for g in range(grid.g)]
        for g, (lr, wd) in enumerate(configs):
            log_record({"epoch": epoch, "config": g, "lr": lr, "weight_decay": wd,
                        "train_loss": float(last_loss[g]), "epoch_seconds": epoch_s, "active": bool(grid.active[g]),
                        **{f"val_{k}": v for k, v in per_config[g].items()}})
        sel.update(epoch, per_config, dev)
        if not grid.active.any():
            log.info("early stopping: every config stopped improving (epoch %d)", epoch)
            break
    if bar is not None:
        bar.close()
    return _finalise(grid, template, data, sel, configs, last_loss, history, metric, st, dev)


def _finalise(grid: HeadGrid, template: Head, data: _Data, sel: _Selection, configs: list[tuple[float, float]],
              last_loss: np.ndarray, history: list[dict[str, Any]], metric: str, st: FitSettings,
              dev: torch.device) -> FitResult:
    """The selected head (thresholds chosen on validation), the per-config summary, every head on request."""
    if data.val is None:
        log.warning("no validation data: taking the config with the lowest final training loss")
        best = int(np.nanargmin(last_loss))
        summary = [{"config": g, "lr": lr, "weight_decay": wd, "train_loss": float(last_loss[g])}
                   for g, (lr, wd) in enumerate(configs)]
        heads = [grid.extract(g).cpu() for g in range(grid.g)] if st.return_all else []
        return FitResult(grid.extract(best).cpu(), {**summary[best], "epoch": st.epochs}, summary, history, None,
                         "train_loss", heads)
    assert data.val_rows is not None and data.val_labels is not None
    best = int(np.argmax(sel.score))
    head = grid.extract(best, sel.snapshot)
    val_pred = predict_rows(head, data.val, np.arange(len(data.val)), st.batch_size, dev)
    if data.task in ("multilabel", "binary", "multiclass"):
        rows = data.val_rows
        # Calibrator, then thresholds on calibrated scores (validation-optimal where the evidence is strong, else
        # the training prevalence), then the informative verdict: adapt/calibrate.py.
        y_rows = data.val_labels[rows]
        prev = (label_prevalence(data.train_labels[data.train_rows]) if data.task != "multiclass" else None)
        val_pred = val_pred.copy()
        val_pred[rows] = calibrate_head(head, y_rows if data.task == "multiclass" else
                                        y_rows.reshape(len(rows), -1), val_pred[rows], st.threshold_method, prev)
    summary = [{"config": g, "lr": lr, "weight_decay": wd, "best_epoch": int(sel.epoch[g]), metric: sel.best_value(g),
                **{f"val_{k}": v for k, v in sel.metrics[g].items()}}
               for g, (lr, wd) in enumerate(configs)]
    heads = [grid.extract(g, sel.snapshot).cpu() for g in range(grid.g)] if st.return_all else []
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


__all__ = ["DEFAULT_LRS", "FitResult", "FitSettings", "fit_heads", "predict_rows"]
