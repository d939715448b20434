"""End-to-end adaptation (no feature cache): the backbone is trained with the head, fully, with LoRA, or
biases only (BitFit), on augmented images. One configuration per run (a grid would multiply backbone cost).

    backbone, result = finetune(backbone, make_head, train_paths, y_train, val_paths, y_val, mode="lora")

LoRA as in the original (`peft`: r=16, alpha=16, dropout 0.1 on the attention `qkv` and `proj` linears),
written here without peft; adapters are merged into the weights at the end, so the returned backbone is a
plain VisionTransformer that saves and loads like any other (with a new sha256 the head records). What LoRA or
BitFit trained is also returned un-merged (`FinetuneResult.adapter_tensors`): `chexfound.adapt.adapter` saves it
as an adapter file tied to the base backbone.
Augmentation as the original's training transform: random resized crop (scale 0.75-1) and horizontal flip.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chexfound.adapt.grid import cosine_scale
from chexfound.adapt.heads.base import Head
from chexfound.adapt.losses import build_loss
from chexfound.models.extract import resolve_dtype
from chexfound.adapt.selection import DEFAULT_METRIC, higher_is_better, task_metrics
from chexfound.runio import resolve_device
from chexfound.adapt.calibrate import calibrate_head
from chexfound.stats.thresholds import label_prevalence

log = logging.getLogger(__name__)
Mode = Literal["full", "lora", "bitfit", "frozen"]


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(dropout(x))), A kaiming-uniform, B zero (so training starts at base)."""

    def __init__(self, base: nn.Linear, r: int = 16, alpha: float = 16.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.base = base
        self.r, self.scaling = r, alpha / r
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(self.drop(x), self.lora_a), self.lora_b) * self.scaling

    def merged(self) -> nn.Linear:
        out = copy.deepcopy(self.base)
        with torch.no_grad():
            out.weight += lora_delta(self.lora_a, self.lora_b, self.scaling).to(out.weight)
        return out


def lora_delta(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """(alpha / r) * B @ A in float32, summed rank by rank with elementwise ops: bitwise the same on every
    machine and device (a matmul's summation order is not), so base + adapter reproduces the merged
    weights' SHA-256 that a head records."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    delta = torch.zeros(b.shape[0], a.shape[1])
    for i in range(a.shape[0]):
        delta += b[:, i : i + 1] * a[i : i + 1, :]
    return delta * scaling


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 16.0, dropout: float = 0.1,
               targets: Sequence[str] = ("qkv", "proj")) -> list[str]:
    """Wrap every nn.Linear whose attribute name is in `targets` (the attention qkv/proj); returns their names."""
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    return wrapped


def merge_lora(model: nn.Module) -> None:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())


def backbone_trainable(backbone: nn.Module, mode: Mode) -> list[nn.Parameter]:
    """Set requires_grad per mode; returns the backbone parameters to optimise."""
    for p in backbone.parameters():
        p.requires_grad_(False)
    if mode == "full":
        params = [p for n, p in backbone.named_parameters() if n != "mask_token"]  # unused outside SSL
    elif mode == "lora":
        params = [p for n, p in backbone.named_parameters() if "lora_" in n]
    elif mode == "bitfit":
        params = [p for n, p in backbone.named_parameters() if n.endswith(".bias")]
    elif mode == "frozen":
        params = []
    else:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; use full, lora, bitfit or frozen")
    for p in params:
        p.requires_grad_(True)
    return params


def random_resized_crop_flip(x: Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.75, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3), p_flip: float = 0.5) -> Tensor:
    """Per-image random resized crop back to the input size (bicubic) and horizontal flip, on a batch."""
    b, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(b):
        u = torch.rand(4, generator=generator).tolist()
        area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
        r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
        cw, ch = min(w, max(1, round(math.sqrt(area * r)))), min(h, max(1, round(math.sqrt(area / r))))
        top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        crop = F.interpolate(crop, size=(h, w), mode="bicubic", align_corners=False)
        if float(torch.rand(1, generator=generator)) < p_flip:
            crop = crop.flip(-1)
        out[i] = crop[0]
    return out


@dataclass
class FinetuneResult:
    head: Head
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    val_predictions: np.ndarray | None = None
    metric: str = ""
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    # LoRA / BitFit: what training changed, as `chexfound.adapt.adapter.Adapter` tensors
    # (`blocks.<i>.attn.qkv.lora_a` ... or the biases) and the LoRA settings; None for full fine-tuning.
    adapter_tensors: dict[str, Tensor] | None = None
    lora: dict[str, Any] = field(default_factory=dict)


def _loader(paths: Sequence[Any], transform: Any, batch_size: int, workers: int, shuffle: bool, seed: int):
    from torch.utils.data import DataLoader

    from chexfound.data.datasets import ImageDataset, collate_skip_errors

    g = torch.Generator().manual_seed(seed)
    return DataLoader(ImageDataset(list(paths), transform), batch_size=batch_size, shuffle=shuffle, generator=g,
                      num_workers=workers, collate_fn=collate_skip_errors)


def _forward(backbone: nn.Module, head: Head, x: Tensor, n_blocks: int, dtype: torch.dtype) -> Tensor:
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        feats = backbone.get_intermediate_layers(x, n=n_blocks, return_class_token=True)
    logits, _ = head(tuple((p.float(), c.float()) for p, c in feats))
    return logits


@dataclass
class FinetuneSettings:
    """Everything `finetune` can be told (`chexfound adapt --finetune` maps its options onto these)."""

    mode: Mode = "lora"
    lr: float = 1e-3                 # head
    backbone_lr: float | None = None  # default: 1e-5 for full fine-tuning, else the head lr
    weight_decay: float = 1e-4
    epochs: int = 5
    batch_size: int = 16
    loss: str | None = None
    class_balance: str = "none"
    metric: str | None = None
    patience: int | None = None
    augment: bool = True
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    threshold_method: str = "f1"
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    workers: int = 0
    seed: int = 0

    @property
    def resolved_backbone_lr(self) -> float:
        return self.backbone_lr if self.backbone_lr is not None else (1e-5 if self.mode == "full" else self.lr)


def _setup(backbone: nn.Module, head: Head, y_tr: np.ndarray, st: FinetuneSettings,
           dev: torch.device) -> tuple[torch.optim.Optimizer, list[float]]:
    """Adapters / trainable parameters per mode, regression target scaling, AdamW with two groups."""
    if head.task == "regression":
        flat = y_tr.reshape(len(y_tr), -1)
        sd = np.nanstd(flat, axis=0)
        head.target_mean.copy_(torch.as_tensor(np.nanmean(flat, axis=0)))
        head.target_std.copy_(torch.as_tensor(np.where(sd > 0, sd, 1.0)))
    if st.mode == "lora":
        apply_lora(backbone, st.lora_r, st.lora_alpha, st.lora_dropout)
    bb_params = backbone_trainable(backbone, st.mode)
    backbone.to(dev)
    head.to(dev)
    groups = [{"params": list(head.parameters()), "lr": st.lr}]
    if bb_params:
        groups.append({"params": bb_params, "lr": st.resolved_backbone_lr})
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=st.weight_decay)
    return opt, [g["lr"] for g in opt.param_groups]


def _train_epoch(backbone: nn.Module, head: Head, loader: Any, targets: Tensor, loss_fn: Any,
                 opt: torch.optim.Optimizer, base_lrs: list[float], st: FinetuneSettings, gen: torch.Generator,
                 step: int, total: int, dt: torch.dtype, dev: torch.device,
                 errors: dict[int, tuple[int, str, str]]) -> tuple[float, int]:
    """One pass over the training images; returns (mean loss, step counter)."""
    backbone.train(st.mode != "frozen")
    head.train()
    total_loss, n = 0.0, 0
    for batch in loader:
        for e in batch["errors"]:
            errors[e[0]] = e
        if "image" not in batch:
            continue
        x = batch["image"].to(dev)
        if st.augment:
            x = random_resized_crop_flip(x, gen)
        y = targets[batch["index"]].to(dev)
        scale = cosine_scale(step, total)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * scale
        out = loss_fn(_forward(backbone, head, x, head.n_blocks, dt), y)
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
        total_loss += float(out.detach()) * len(x)
        n += len(x)
        step += 1
    return total_loss / max(n, 1), step


def _validate(backbone: nn.Module, head: Head, val_paths: Sequence[Any], val_labels: np.ndarray, tf: Any,
              st: FinetuneSettings, dev: torch.device,
              dt: torch.dtype) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """(predictions, metrics on the readable rows, which rows were readable)."""
    pred = predict_images(backbone, head, val_paths, tf, st.batch_size, dev, dt, st.workers)
    y_va = np.asarray(val_labels, dtype=np.float32)
    ok = ~np.isnan(pred).any(1)
    return pred, task_metrics(head.task, y_va[ok], pred[ok], head.findings), ok


def finetune(
    backbone: nn.Module,
    make_head: Callable[[], Head],
    train_paths: Sequence[Any],
    train_labels: np.ndarray,
    val_paths: Sequence[Any] | None = None,
    val_labels: np.ndarray | None = None,
    settings: FinetuneSettings | None = None,
    *,
    transform: Any = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> tuple[nn.Module, FinetuneResult]:
    """Train backbone + head end to end; returns (backbone with adapters merged, result with the best head on
    val by the metric). The backbone is modified in place (copy it first to keep the original). Settings come
    as a `FinetuneSettings` and/or as its field names (`finetune(..., mode="bitfit", epochs=2)`)."""
    from chexfound.data.transform import InputTransform

    unknown = set(overrides) - {f.name for f in fields(FinetuneSettings)}
    if unknown:
        raise TypeError(f"finetune() got unknown settings {sorted(unknown)}")
    st = replace(settings or FinetuneSettings(), **overrides)
    dev, dt = resolve_device(st.device), resolve_dtype(st.dtype)
    torch.manual_seed(st.seed)
    gen = torch.Generator().manual_seed(st.seed)
    tf = transform or InputTransform.for_backbone(backbone.cfg)
    head = make_head()
    task = head.task
    y_tr = np.asarray(train_labels, dtype=np.float32)
    opt, base_lrs = _setup(backbone, head, y_tr, st, dev)
    loss_fn = build_loss(task, st.loss, y_tr, head.out_dim, st.class_balance)
    targets = torch.as_tensor(y_tr)
    if task == "regression":
        targets = (targets.reshape(len(y_tr), -1) - head.target_mean.cpu()) / head.target_std.cpu()
    metric = st.metric or DEFAULT_METRIC[task]
    sign = 1.0 if higher_is_better(metric) else -1.0
    train_loader = _loader(train_paths, tf, st.batch_size, st.workers, True, st.seed)
    total = max(1, len(train_loader) * st.epochs)
    errors: dict[int, tuple[int, str, str]] = {}
    history: list[dict[str, Any]] = []
    best_score, best_epoch, bad = -math.inf, 0, 0
    best_state: dict[str, Any] | None = None
    has_val = val_paths is not None and val_labels is not None
    step = 0
    for epoch in range(1, st.epochs + 1):
        loss, step = _train_epoch(backbone, head, train_loader, targets, loss_fn, opt, base_lrs, st, gen, step,
                                  total, dt, dev, errors)
        rec: dict[str, Any] = {"epoch": epoch, "mode": st.mode, "lr": st.lr, "backbone_lr": st.resolved_backbone_lr,
                               "train_loss": loss}
        if has_val:
            _, m, _ = _validate(backbone, head, val_paths, val_labels, tf, st, dev, dt)  # type: ignore[arg-type]
            rec.update({f"val_{k}": v for k, v in m.items()})
            score = sign * m[metric] if not math.isnan(m[metric]) else -math.inf
            if best_state is None or score > best_score:
                best_score, best_epoch, bad = score, epoch, 0
                best_state = {"head": copy.deepcopy(head.state_dict()),
                              "backbone": copy.deepcopy(backbone.state_dict())}
            else:
                bad += 1
        history.append(rec)
        if callback:
            callback(rec)
        if st.patience is not None and bad >= st.patience:
            log.info("early stopping after epoch %d", epoch)
            break
    return _finish(backbone, head, best_state, best_epoch, history, errors, val_paths, val_labels, tf, st, metric,
                   dev, dt, label_prevalence(y_tr.reshape(len(y_tr), -1)))


def _finish(backbone: nn.Module, head: Head, best_state: dict[str, Any] | None, best_epoch: int,
            history: list[dict[str, Any]], errors: dict[int, tuple[int, str, str]], val_paths: Sequence[Any] | None,
            val_labels: np.ndarray | None, tf: Any, st: FinetuneSettings, metric: str, dev: torch.device,
            dt: torch.dtype, train_prevalence: np.ndarray) -> tuple[nn.Module, FinetuneResult]:
    """Best state restored, LoRA merged, everything frozen; thresholds chosen on validation."""
    if best_state is not None:
        head.load_state_dict(best_state["head"])
        backbone.load_state_dict(best_state["backbone"])
    backbone.cpu()  # merged on the CPU in float32, as `apply_adapter` does: the same weights, bitwise
    adapter_tensors: dict[str, Tensor] | None = None
    if st.mode in ("lora", "bitfit"):
        keep = (lambda n: ".lora_" in n) if st.mode == "lora" else (lambda n: n.endswith(".bias"))
        adapter_tensors = {n: p.detach().float().clone() for n, p in backbone.named_parameters() if keep(n)}
    if st.mode == "lora":
        merge_lora(backbone)
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.to(dev).eval()
    head.eval()
    config = {"mode": st.mode, "lr": st.lr, "backbone_lr": st.resolved_backbone_lr, "weight_decay": st.weight_decay,
              "best_epoch": best_epoch or len(history)}
    val_pred = None
    if val_paths is not None and val_labels is not None:
        val_pred, m, ok = _validate(backbone, head, val_paths, val_labels, tf, st, dev, dt)
        config[metric] = m[metric]
        if head.task in ("multilabel", "binary", "multiclass"):
            y_va = np.asarray(val_labels, dtype=np.float32)
            # Calibrator, thresholds on calibrated scores, informative verdict (adapt/calibrate.py).
            y_ok = y_va[ok] if head.task == "multiclass" else y_va[ok].reshape(int(ok.sum()), -1)
            val_pred = val_pred.copy()
            val_pred[ok] = calibrate_head(head, y_ok, val_pred[ok], st.threshold_method,
                                          None if head.task == "multiclass" else train_prevalence)
    lora = ({"r": st.lora_r, "alpha": st.lora_alpha, "dropout": st.lora_dropout, "targets": ["proj", "qkv"]}
            if st.mode == "lora" else {})
    return backbone.cpu(), FinetuneResult(head.cpu(), config, history, val_pred, metric, sorted(errors.values()),
                                          adapter_tensors, lora)


@torch.no_grad()
def predict_images(backbone: nn.Module, head: Head, paths: Sequence[Any], transform: Any, batch_size: int,
                   device: torch.device, dtype: torch.dtype = torch.float32, workers: int = 0) -> np.ndarray:
    """Outputs [N, K] of backbone + head on images (no augmentation); unreadable images give NaN rows."""
    was = backbone.training, head.training
    backbone.eval()
    head.eval()
    out = np.full((len(paths), head.out_dim), np.nan, dtype=np.float32)
    for batch in _loader(paths, transform, batch_size, workers, False, 0):
        if "image" in batch:
            logits = _forward(backbone, head, batch["image"].to(device), head.n_blocks, dtype)
            out[batch["index"].numpy()] = head.probabilities(logits).float().cpu().numpy()
    backbone.train(was[0])
    head.train(was[1])
    return out
