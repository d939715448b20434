"""Is it learning? Collapse detection while the run goes, and the run report (PNG of the curves).

Teacher-side statistics logged every `log_every` iterations (see meta_arch): `teacher_entropy` (mean entropy of
the per-image targets), `teacher_mean_entropy` (entropy of the batch-mean target), `prototypes_in_use`
(distinct argmax prototypes in the batch), plus the losses and, periodically, probe AUROCs.

The two DINO failure modes:
  uniform  targets flat over all K prototypes: teacher_entropy ~ ln K and the loss stuck at ~ln K; nothing
           is being distilled.
  one-hot  every image sent to the same prototype(s): prototypes_in_use ~ 1 and teacher_mean_entropy ~ 0.
Early on targets are close to uniform by construction (random heads), so the monitor only judges after a
grace period, and needs `patience` consecutive bad log rows before it warns.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from chexfound.runio import atomic_output, read_jsonl

log = logging.getLogger(__name__)


class CollapseMonitor:
    def __init__(self, total_iterations: int, grace_fraction: float = 0.15, patience: int = 3,
                 uniform_fraction: float = 0.97, onehot_max_prototypes: int = 2) -> None:
        self.grace = int(total_iterations * grace_fraction)
        self.patience = patience
        self.uniform_fraction = uniform_fraction
        self.onehot_max = onehot_max_prototypes
        self.counts = {"uniform": 0, "one-hot": 0}
        self.warned: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "warned": sorted(self.warned)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.counts.update(d.get("counts", {}))
        self.warned = set(d.get("warned", []))

    def check(self, it: int, stats: dict[str, float], n_rows: int) -> str | None:
        """A warning message the first time a collapse persists, else None."""
        if it < self.grace:
            return None
        log_k = stats["log_n_prototypes"]
        flags = {
            "uniform": stats["teacher_entropy"] > self.uniform_fraction * log_k,
            "one-hot": n_rows >= 8 and stats["prototypes_in_use"] <= self.onehot_max,
        }
        msg = None
        for kind, bad in flags.items():
            self.counts[kind] = self.counts[kind] + 1 if bad else 0
            if self.counts[kind] >= self.patience and kind not in self.warned:
                self.warned.add(kind)
                if kind == "uniform":
                    msg = (f"collapse warning at iteration {it}: teacher targets are near-uniform "
                           f"(entropy {stats['teacher_entropy']:.2f} of ln K = {log_k:.2f}); the model distils "
                           "nothing. Try fewer prototypes (dino.head_n_prototypes), a lower teacher "
                           "temperature, or a faster teacher (teacher.momentum_teacher).")
                else:
                    msg = (f"collapse warning at iteration {it}: the teacher sends the whole batch to "
                           f"{int(stats['prototypes_in_use'])} prototype(s) (entropy of the mean target "
                           f"{stats['teacher_mean_entropy']:.2f}). Use centering=sinkhorn_knopp, or a larger "
                           "center_momentum / lower lr.")
        return msg


# -- report ----------------------------------------------------------------------------------------
def plot_report(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """A 3x3 grid of the training curves; None when there is nothing to plot."""
    logged = read_jsonl(metrics_path)
    rows = [r for r in logged if r.get("kind") == "train"]
    probes = [r for r in logged if r.get("kind") == "probe"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in rows]

    def series(key: str) -> list[float]:
        return [r.get(key, math.nan) for r in rows]

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
    for a in ax:
        a.set_xlabel("iteration")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return out
