"""The demo's settings and its two tasks (Kermany, NIH-14): where each task's manifest, splits and cached inputs
are, read the same way by every stage (`chexfound.demo.pipeline` fits, `chexfound.demo.evaluations` scores)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chexfound.data.manifest import Manifest

NIH_BOX_RENAME = {"Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening"}
# Hernia has 2 positives in the NIH subset: no split can score it (shared data README).
NIH_EXCLUDE = ("Hernia",)


@dataclass
class DemoConfig:
    data: Path
    out: Path
    quick: bool = False
    seed: int = 0
    device: str | None = None
    preset: str = "demo_tiny"
    pretrain_budget_s: float | None = None  # None: by mode (and shipped checkpoint)
    weights: str | Path | None = None       # a pretrained backbone (file or hf:// id); None: look in weights/
    use_shipped: bool = True
    n_boot: int = 1000

    def budget(self, shipped: bool) -> float:
        """Pretraining wall-clock: a pipeline check when a shipped checkpoint is the backbone, else the run."""
        if self.pretrain_budget_s is not None:
            return float(self.pretrain_budget_s)
        if self.quick:
            return 45.0
        return 90.0 if shipped else 420.0


def task_manifest(path: Path, labels: list[str]) -> Manifest:
    """A demo task's manifest (written by `prepare_data`) with `labels` as its label columns."""
    from chexfound.data.manifest import read_manifest

    return read_manifest(path, labels=labels)


@dataclass
class TaskSpec:
    name: str            # kermany | nih14
    manifest: Path
    findings: list[str]
    heads: tuple[str, ...]


def split_rows(m: Manifest) -> dict[str, np.ndarray]:
    """Row indices of the train / val / test splits of a demo manifest."""
    s = m.df["split"].astype(str).to_numpy()
    return {k: np.flatnonzero(s == k) for k in ("train", "val", "test")}


def probe_inputs(cache: Any, n_blocks: int) -> np.ndarray:
    """The linear probe's input per cached image: CLS of the last n blocks + the mean patch token (DINOv2's
    "avgpool" probe: with LayerScale 1e-5 a random-init ViT's CLS output is nearly constant, and a CLS-only
    probe would make that baseline a strawman). Exactly what a `LinearHead(avgpool=True)` reads."""
    return cache.pooled().vectors(n_blocks, avgpool=True)


def pixel_source(cfg: DemoConfig, task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """The pixel features `pixel_baseline` stored for every manifest row, and which rows could be read (an
    unreadable image is a row of zeros that no split may use). A run folder from before the mask was stored:
    the rows that are not all zeros."""
    x = np.load(cfg.out / "cache" / f"pixels-{task.name}.npy")
    ok_file = cfg.out / "cache" / f"pixels-{task.name}-ok.npy"
    ok = np.load(ok_file) if ok_file.is_file() else np.any(x != 0, axis=1)
    return x, np.asarray(ok, dtype=bool)
