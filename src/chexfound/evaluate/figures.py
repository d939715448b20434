"""Matplotlib figures for reports (Agg backend; each function returns PNG bytes for an atomic write)."""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # layout is set by tight_layout (bbox "tight" doubles the cost)
    plt.close(fig)
    return buf.getvalue()


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, max(1, n))
    return math.ceil(n / cols), cols


def _curves(y: np.ndarray, p: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    prec, rec, _ = precision_recall_curve(y, p)
    return (fpr, tpr), (rec, prec)


def roc_pr_grid(
    y: np.ndarray, preds: Mapping[str, np.ndarray], findings: Sequence[str], kind: str,
    per_finding: Mapping[str, Mapping[str, Any]] | None = None,
) -> bytes:
    """One panel per finding with one curve per model; kind 'roc' or 'pr'. Findings without both classes are
    shown as empty panels with a note."""
    y = np.asarray(y, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    rows, cols = _grid(len(findings))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for c, f in enumerate(findings):
        ax = axes[c // cols][c % cols]
        m = ~np.isnan(y[:, c])
        yc = y[m, c]
        has_both = yc.size and 0 < yc.sum() < yc.size
        for label, p in preds.items():
            p = np.asarray(p, dtype=np.float64)
            p = p[:, None] if p.ndim == 1 else p
            if not has_both:
                continue
            roc, pr = _curves(yc, p[m, c])
            xs, ys = roc if kind == "roc" else pr
            ax.plot(xs, ys, lw=1.3, label=label if len(preds) > 1 else None,
                    drawstyle="steps-post" if kind == "pr" else "default")
        if has_both:
            if kind == "roc":
                ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
            else:
                ax.axhline(yc.mean(), ls=":", c="grey", lw=0.8)
        else:
            ax.text(0.5, 0.5, "needs positives\nand negatives", ha="center", va="center", fontsize=8)
        title = f
        if per_finding and f in per_finding:
            k = "auroc" if kind == "roc" else "ap"
            v = per_finding[f].get(k)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                title += f"\n{k.upper()} {v:.3f}, n+={per_finding[f].get('n_pos', '?')}"
        ax.set_title(title, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("1 - specificity" if kind == "roc" else "recall", fontsize=7)
        ax.set_ylabel("sensitivity" if kind == "roc" else "precision", fontsize=7)
        if len(preds) > 1 and c == 0 and has_both:
            ax.legend(fontsize=6)
    for c in range(len(findings), rows * cols):
        axes[c // cols][c % cols].axis("off")
    fig.suptitle("ROC curves" if kind == "roc" else "Precision-recall curves", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def label_efficiency_curve(curve: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]] | None = None) -> bytes:
    """Macro AUROC and AP (mean +- std over seeds, individual seeds as dots) vs % of training patients."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    fr = np.array([c["fraction"] for c in curve]) * 100
    for ax, k in zip(axes, ("auroc", "ap")):
        m = np.array([c[f"{k}_mean"] for c in curve], dtype=float)
        s = np.array([c[f"{k}_std"] for c in curve], dtype=float)
        ax.plot(fr, m, marker="o", lw=1.5)
        ax.fill_between(fr, m - s, m + s, alpha=0.2)
        if runs:
            ax.scatter([r["fraction"] * 100 for r in runs], [r["macro"][k] for r in runs], s=8, c="k", alpha=0.4)
        ax.set_xscale("log")
        ax.set_xticks(fr)
        ax.set_xticklabels([f"{v:g}" for v in fr], fontsize=7)
        ax.set_xlabel("% of training patients")
        ax.set_ylabel(f"macro {k.upper()}")
        ax.grid(alpha=0.3)
    fig.suptitle("Label efficiency (mean ± s.d. over seeds)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def group_bars(groups_by_model: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> bytes:
    """Bars of AUROC and AP per prevalence group (with CI whiskers when present), one bar per model."""
    models = list(groups_by_model)
    gnames = [g for g in ("head", "medium", "tail") if any(g in v for v in groups_by_model.values())]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    width = 0.8 / max(1, len(models))
    for ax, k in zip(axes, ("auroc", "ap")):
        for i, mname in enumerate(models):
            g = groups_by_model[mname]
            vals = [g.get(n, {}).get(k, np.nan) for n in gnames]
            cis = [g.get(n, {}).get(f"{k}_ci", [np.nan, np.nan]) for n in gnames]
            x = np.arange(len(gnames)) + (i - (len(models) - 1) / 2) * width
            v = np.array(vals, dtype=float)
            lo = np.array([c[0] if c[0] is not None else np.nan for c in cis], dtype=float)
            hi = np.array([c[1] if c[1] is not None else np.nan for c in cis], dtype=float)
            err = np.vstack([np.nan_to_num(v - lo), np.nan_to_num(hi - v)])
            ax.bar(x, np.nan_to_num(v), width, yerr=err, capsize=3, label=mname)
        ax.set_xticks(np.arange(len(gnames)))
        ax.set_xticklabels([f"{n}\n({len(next(iter(groups_by_model.values())).get(n, {}).get('findings', []))} findings)"
                            for n in gnames], fontsize=8)
        ax.set_ylabel(k.upper())
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    if len(models) > 1:
        axes[0].legend(fontsize=7)
    fig.suptitle("By training-set prevalence group", fontsize=10)
    fig.tight_layout()
    return _png(fig)


_GREEN = LinearSegmentedColormap.from_list("white_green", [(1, 1, 1, 0), (0.0, 0.75, 0.2, 1.0)])


def heatmap_gallery(items: Sequence[Any], cols: int = 4) -> bytes:
    """Images in model-input geometry with the attention map (white-to-green, alpha ramp) and boxes in red.
    Titles mark pointing-game hits (✓) and misses (✗)."""
    n = max(1, len(items))
    rows, cols = _grid(n, cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.1 * rows), squeeze=False)
    for i, it in enumerate(items):
        ax = axes[i // cols][i % cols]
        ax.imshow(it.image, cmap="gray", vmin=0, vmax=1)
        hm = np.asarray(it.heatmap, dtype=np.float64)
        rng = hm.max() - hm.min()
        hm = (hm - hm.min()) / rng if rng > 0 else np.zeros_like(hm)
        ax.imshow(hm, cmap=_GREEN, vmin=0, vmax=1)
        for x0, y0, x1, y1 in it.boxes:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1.2))
        py, px = np.unravel_index(int(np.argmax(it.heatmap)), np.shape(it.heatmap))
        ax.plot(px + 0.5, py + 0.5, marker="+", c="yellow", ms=9, mew=1.5)
        ax.set_title(f"{'✓' if it.hit else '✗'} {it.title}", fontsize=7)
        ax.axis("off")
    for i in range(len(items), rows * cols):
        axes[i // cols][i % cols].axis("off")
    fig.suptitle("Attention (green), expert boxes (red), peak (+)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def localisation_bars(per_finding: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Pointing accuracy and attention mass in boxes per finding: model vs centre prior (vs uniform)."""
    names = list(per_finding)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(len(names))
    for ax, (title, series) in zip(axes, (
            ("pointing game accuracy", (("model", "pointing"), ("centre prior", "centre_pointing"))),
            ("attention mass in boxes", (("model", "mass"), ("centre prior", "centre_mass"),
                                         ("uniform", "uniform_mass"))))):
        w = 0.8 / len(series)
        for i, (lab, key) in enumerate(series):
            v = np.array([per_finding[n].get(key, np.nan) for n in names], dtype=float)
            ax.bar(x + (i - (len(series) - 1) / 2) * w, np.nan_to_num(v), w, label=lab)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def reliability_grid(y: np.ndarray, preds: Mapping[str, np.ndarray], findings: Sequence[str],
                     per_finding: Mapping[str, Mapping[str, Any]] | None = None, n_bins: int = 10) -> bytes:
    """One panel per finding: observed positive rate against mean prediction in equal-mass bins (Wilson 95%
    intervals, one line per model), the diagonal of perfect calibration, and a histogram of the predictions
    beneath (chexfound.stats.calibration.reliability_bins)."""
    from chexfound.stats.calibration import reliability_bins

    y = np.asarray(y, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    rows, cols = _grid(len(findings))
    fig = plt.figure(figsize=(3.2 * cols, 3.6 * rows))
    outer = fig.add_gridspec(rows, cols)
    for c, f in enumerate(findings):
        inner = outer[c // cols, c % cols].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
        ax, hx = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
        m = ~np.isnan(y[:, c])
        for label, p in preds.items():
            p = np.asarray(p, dtype=np.float64)
            p = p[:, None] if p.ndim == 1 else p
            b = reliability_bins(y[m, c], p[m, c], n_bins)
            if not b["count"]:
                continue
            mp, ob = np.array(b["mean_predicted"]), np.array(b["observed"])
            err = np.maximum(np.stack([ob - np.array(b["observed_lo"]), np.array(b["observed_hi"]) - ob]), 0)
            ax.errorbar(mp, ob, yerr=err, marker="o", ms=3, lw=1, capsize=2,
                        label=label if len(preds) > 1 else None)
            hx.hist(p[m, c], bins=30, range=(0, 1), alpha=0.6)
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        title = f
        if per_finding and f in per_finding:
            e, br = per_finding[f].get("ece"), per_finding[f].get("brier")
            if e is not None and not (isinstance(e, float) and math.isnan(e)):
                title += f"\nECE {e:.3f}, Brier {br:.3f}, n+={per_finding[f].get('n_pos', '?')}"
        ax.set_title(title, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xticklabels([])
        ax.tick_params(labelsize=7)
        ax.set_ylabel("observed rate", fontsize=7)
        hx.set_xlim(0, 1)
        hx.tick_params(labelsize=6)
        hx.set_xlabel("mean predicted probability", fontsize=7)
        if c == 0 and len(preds) > 1:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)
