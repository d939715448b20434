"""Is it learning? The run report (PNG of the curves) from metrics.jsonl.

Teacher-side statistics logged every `log_every` iterations (see meta_arch): `teacher_entropy` (mean entropy of
the per-image targets), `teacher_mean_entropy` (entropy of the batch-mean target), `prototypes_in_use`
(distinct argmax prototypes in the batch), plus the losses and, periodically, probe AUROCs. The collapse
warnings read the same statistics while the run goes: they are a signal of the health detector
(chexfound.ssl.heal.CollapseSignal)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from chexfound.runio import atomic_output, read_jsonl

log = logging.getLogger(__name__)


# -- report ----------------------------------------------------------------------------------------
def loss_trend(rows: list[dict[str, Any]]) -> str | None:
    """Did the loss fall? The mean of the first and of the last tenth of the train rows (at least 4 rows)."""
    losses = [float(r["loss"]) for r in rows if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float))]
    if len(losses) < 4:
        return None
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return (f"loss: {first:.4f} (first {k} log rows) -> {last:.4f} (last {k}); "
            f"{'fell' if last < first else 'did NOT fall'}")


def rollback_marks(rows: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    """(iteration detected, iteration rolled back to, reason) of every `kind: rollback` row."""
    return [(int(r["detected_at"]), int(r["iteration"]), str(r.get("reason", "")))
            for r in rows if r.get("kind") == "rollback"]


def plot_report(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """A 3x3 grid of the training curves; None when there is nothing to plot (or no matplotlib).
    Rollbacks are marked: a dotted red line where a divergence was detected, a solid one where the run went
    back to, and the abandoned stretch drawn in grey."""
    all_rows = read_jsonl(metrics_path)
    rows = [r for r in all_rows if r.get("kind") == "train"]
    abandoned = [r for r in all_rows if r.get("kind") == "train_abandoned"]
    probes = [r for r in all_rows if r.get("kind") == "probe"]
    marks = rollback_marks(all_rows)
    if not rows:
        return None
    try:
        import matplotlib
    except ImportError:
        log.warning("no report.png: matplotlib is not installed (pip install matplotlib)")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in rows]

    def series(key: str, src: list[dict[str, Any]] | None = None) -> list[float]:
        return [math.nan if r.get(key) is None else r[key] for r in (rows if src is None else src)]

    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    ax = axes.ravel()
    for k in ("loss", "dino_local_loss", "dino_global_loss", "ibot_loss"):
        ax[0].plot(it, series(k), label=k)
    ax[0].set_title("losses")
    ax[1].plot(it, series("koleo_loss"), color="C4")
    ax[1].set_title("KoLeo")
    lk = series("log_n_prototypes")
    ax[2].plot(it, series("teacher_entropy"), label="teacher entropy")
    ax[2].plot(it, series("teacher_mean_entropy"), label="entropy of mean target")
    ax[2].plot(it, lk, "k--", label="ln K")
    ax[2].set_title("teacher targets (nats)")
    ax[3].plot(it, series("prototypes_in_use"))
    ax[3].set_title("prototypes in use (per batch)")
    ax[4].plot(it, series("lr"), label="lr")
    ax[4].set_title("learning rate")
    ax5 = ax[5]
    for k in ("wd", "momentum", "teacher_temp"):
        ax5.plot(it, series(k), label=k)
    ax5.set_title("wd / momentum / teacher temp")
    ax5.set_yscale("log")
    ax[6].plot(it, series("grad_norm"))
    ax[6].set_title("grad norm (before clipping)")
    ax[6].set_yscale("log")
    ax[7].plot(it, series("images_per_s"))
    ax[7].set_title("images / s")
    if probes:
        pit = [r["iteration"] for r in probes]
        for k in sorted({k for r in probes for k in r if k.endswith("auroc")}):
            ax[8].plot(pit, [r.get(k, math.nan) for r in probes], "o-", label=k)
    ax[8].set_title("probe AUROC (hold-out)")
    if abandoned:
        ait = [r["iteration"] for r in abandoned]
        for a, k in ((ax[0], "loss"), (ax[2], "teacher_entropy"), (ax[6], "grad_norm")):
            a.plot(ait, series(k, abandoned), ".", color="0.6", label=f"{k} (abandoned)")
    for n, (detected, back_to, reason) in enumerate(marks):
        for a in ax[:8]:
            a.axvline(detected, color="r", linestyle=":", linewidth=1)
            a.axvline(back_to, color="r", linewidth=1, label=f"rollback ({reason})" if n == 0 and a is ax[0] else None)
    for a in ax:
        a.set_xlabel("iteration")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    if marks:
        title = f"{title}  [{len(marks)} rollback(s)]"
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return out
