"""The head-training step of every protocol, behind one small interface.

A protocol only needs: fit a head on some training rows (choosing hyper-parameters and decision thresholds
on validation rows), then predict probabilities for other rows, possibly of another dataset (OOD).

    model = trainer.fit(source, y, train_idx, val_idx, seed)
    probs = model.predict(source_or_other, idx)        # [len(idx), C]
    model.thresholds                                    # [C], chosen on val
    model.info                                          # what was selected, and how each threshold was chosen

`source` is whatever the trainer reads features from: a [N, F] array for `LogisticTrainer` (the statistics
layer's logistic probe, `chexfound.stats.logistic`), the adapt stage's feature cache for `AdaptTrainer` (the
heads users train with `chexfound adapt`: GLoRI, linear, MLP, with their learning-rate grid). Thresholds follow
`chexfound.stats.thresholds` (validation-optimal where the evidence is strong, else the training prevalence).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from chexfound.adapt.heads import HEAD_TYPES, head_class
from chexfound.stats.logistic import LogisticTrainer

__all__ = ["ADAPT_HEADS", "AdaptHead", "AdaptTrainer", "FittedHead", "HeadTrainer", "LogisticTrainer",
           "build_cache", "train_and_predict"]


class FittedHead(Protocol):
    thresholds: np.ndarray
    info: dict[str, Any]

    def predict(self, source: Any, idx: np.ndarray) -> np.ndarray: ...


class HeadTrainer(Protocol):
    name: str

    def fit(self, source: Any, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray | None,
            seed: int = 0) -> FittedHead: ...


def train_and_predict(trainer: HeadTrainer, source: Any, y: np.ndarray, train_idx: np.ndarray,
                      test_idx: np.ndarray, val_idx: np.ndarray | None = None, seed: int = 0,
                      test_source: Any = None) -> tuple[np.ndarray, FittedHead]:
    """Fit on train (select on val) and return test probabilities [len(test_idx), C] and the fitted head."""
    model = trainer.fit(source, y, train_idx, val_idx, seed)
    return model.predict(source if test_source is None else test_source, test_idx), model


# --- the adapt stage's heads on a feature cache ------------------------------------------------------------

ADAPT_HEADS = tuple(HEAD_TYPES)  # the adapt stage's registry (chexfound.adapt.heads)


def build_cache(backbone: torch.nn.Module, paths: Sequence[str | PathLike[str]], transform: Any, n_blocks: int,
                root: str | PathLike[str], backbone_sha256: str, batch_size: int = 32, device: str | None = None,
                dtype: str = "fp32", workers: int = 0, progress: bool = False) -> Any:
    """Build (or reuse: the cache resumes and checks its inputs) the feature cache of `paths`."""
    from chexfound.adapt.token_cache import FeatureCache

    return FeatureCache.build(backbone, [str(p) for p in paths], Path(root), n_blocks=n_blocks,
                              batch_size=batch_size, device=device, dtype=dtype, transform=transform,
                              workers=workers, backbone_sha256=backbone_sha256, progress=progress)


@dataclass
class AdaptHead:
    head: Any
    thresholds: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, source: Any, idx: np.ndarray) -> np.ndarray:
        from chexfound.adapt.inference import predict

        return predict(self.head, source, indices=np.asarray(idx), device=self.info.get("device")).numpy()

    def predict_uncalibrated(self, source: Any, idx: np.ndarray) -> np.ndarray | None:
        """Probabilities without the post-hoc calibrator (None when the head has none): calibration before/after."""
        cal = getattr(self.head, "calibration", None)
        if cal is None:
            return None
        self.head.calibration = None
        try:
            return self.predict(source, idx)
        finally:
            self.head.calibration = cal

    @property
    def has_attention(self) -> bool:
        return bool(getattr(self.head, "has_attention", False))


@dataclass
class AdaptTrainer:
    """Train one adapt head type on cached features; hyper-parameters as `chexfound adapt` (13-lr grid)."""

    head_type: str
    findings: Sequence[str]
    n_blocks: int
    embed_dim: int
    task: str = "multilabel"
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    fit_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head type {self.head_type!r} is not one of {tuple(HEAD_TYPES)}")
        self.name = self.name or f"adapt-{self.head_type}"

    def _make(self) -> Any:
        return head_class(self.head_type)(list(self.findings), self.n_blocks, task=self.task,
                                          embed_dim=self.embed_dim, **self.head_kwargs)

    def fit(self, source: Any, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray | None,
            seed: int = 0) -> AdaptHead:
        from chexfound.adapt.fit import fit_heads

        y = np.asarray(y, dtype=np.float32)
        have_val = val_idx is not None and len(val_idx) > 0
        res = fit_heads(self._make, source, y, source if have_val else None, y if have_val else None,
                        train_indices=np.asarray(train_idx), val_indices=np.asarray(val_idx) if have_val else None,
                        seed=seed, **self.fit_kwargs)
        head = res.head.eval()
        info = {"trainer": self.name, "head_type": self.head_type, "selected": res.config, "metric": res.metric,
                "n_configs": len(res.configs), "n_train": int(len(train_idx)),
                "n_val": int(len(val_idx)) if have_val else 0,
                "threshold_rule": [c.get("rule", "") + " (" + c.get("reason", "") + ")"
                                   for c in getattr(head, "threshold_rules", [])] or "0.5 (no val)",
                "device": self.fit_kwargs.get("device")}
        return AdaptHead(head, head.thresholds.detach().cpu().numpy().astype(np.float64), info)
