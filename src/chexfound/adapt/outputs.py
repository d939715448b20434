"""What an adapt run writes: the head file (with the backbone identity and input transform), the grid and
per-finding tables, validation predictions, skipped images, heatmaps and the summary."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from chexfound.adapt.calibrate import calibration_table
from chexfound.adapt.heads import Head, save_head
from chexfound.adapt.options import AdaptOptions
from chexfound.adapt.selection import per_finding
from chexfound.models.card_results import adapt_tables
from chexfound.runio import SKIPPED_FILE, SkippedInput, atomic_write_bytes, atomic_write_json, write_skipped

log = logging.getLogger(__name__)


@dataclass
class RunBackbone:
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
class TrainedHead:
    """The selected head of a run, how it was selected, and what the outputs need besides."""

    head: Head
    best: dict[str, Any]
    configs: list[dict[str, Any]]
    val_predictions: np.ndarray | None
    metric: str
    val_source: Any  # where heatmaps read attention from (None for end-to-end runs)
    skipped: list[tuple[str, str, str]]


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(path, df.to_csv(index=False).encode())


def write_outputs(opts: AdaptOptions, name: str, out: Path, bb: RunBackbone, tr: TrainedHead, findings: list[str],
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
    if opts.finetune in ("lora", "bitfit"):  # the backbone is base + this adapter (`predict --adapter`)
        extra["adapter"] = f"{name}.adapter.safetensors"
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
            cal = {c["finding"]: c for c in calibration_table(head)}
            for r, t, rule in zip(rows, head.thresholds.tolist(), rules):
                r["threshold"] = t
                r["threshold_rule"] = rule.get("rule", "")
                r["threshold_reason"] = rule.get("reason", "")
                r.update({k: v for k, v in cal.get(r["finding"], {}).items() if k != "finding"})
            table = pd.DataFrame(rows)
            _write_csv(table, files["val_per_finding"])
            summary["per_finding"] = rows
            if head.informative is not None:
                summary["informative"] = {k: head.informative[k] for k in ("informative", "reason", "rule")}
            if head.calibration_info:
                summary["calibration"] = {"rule": head.calibration_info.get("rule"),
                                          "methods": head.calibration_info.get("methods")}
            if not opts.quiet:
                print(_format_table(table))
    # The head file's model card carries the validation numbers above (from the same summary as metrics.json).
    save_head(head, head_path, backbone_sha256=bb.sha256, backbone_config=bb.config, transform=bb.transform.to_dict(),
              extra=extra, results=adapt_tables(summary, files["summary"].name))
    if tr.skipped:
        write_skipped(out / SKIPPED_FILE, [SkippedInput(split, None, p, r) for split, p, r in tr.skipped])
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
    lines = [f"{'finding':<28} {'n_pos':>6} {'n_neg':>6} {'AUROC':>7} {'AP':>7} {'thr':>6}  {'rule':<10} "
             f"{'calibration':<11} {'ECE val before->after':>21}  call"]
    for r in df.itertuples():
        eb, ea = getattr(r, "val_ece_before", None), getattr(r, "val_ece_after", None)
        ece = f"{eb:.3f} -> {ea:.3f}" if isinstance(eb, float) and isinstance(ea, float) else ""
        call = "no call" if getattr(r, "informative", None) is False else ""
        lines.append(f"{str(r.finding)[:28]:<28} {r.n_pos:>6d} {r.n_neg:>6d} {r.auroc:>7.3f} {r.ap:>7.3f} "
                     f"{r.threshold:>6.3f}  {str(getattr(r, 'threshold_rule', '')):<10} "
                     f"{str(getattr(r, 'calibration', '') or ''):<11} {ece:>21}  {call}")
    macro = df[["auroc", "ap"]].mean(skipna=True)
    lines.append(f"{'macro (scored findings)':<28} {'':>6} {'':>6} {macro['auroc']:>7.3f} {macro['ap']:>7.3f}")
    return "\n".join(lines)
