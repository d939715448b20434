"""What one image's prediction is: `Prediction` (probabilities, calls at the head's thresholds, attention).

The result type shared by `Predictor`, the prediction store of `chexfound predict` and the HTTP service; it
depends on nothing but numpy, so every serve module can use it without importing the model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Tasks whose outputs are probabilities that a threshold turns into a positive/negative call.
CALL_TASKS = ("multilabel", "binary", "multiclass")


@dataclass
class Prediction:
    """The result for one image. `probabilities` is None (and `error` says why) for unreadable files."""

    path: str | None
    findings: list[str]
    thresholds: np.ndarray
    task: str
    probabilities: np.ndarray | None = None
    attention: np.ndarray | None = None  # [C, gh, gw] or None
    error: str | None = None
    image_meta: dict[str, Any] = field(default_factory=dict)
    view: np.ndarray | None = None  # the model's view as float32 [D, D] in [0, 1] (for overlays), on request
    threshold_rules: list[dict[str, str]] | None = None  # per finding: {"rule", "reason"} the head recorded

    @property
    def ok(self) -> bool:
        """Whether the image was read and scored (False: `error` says why not)."""
        return self.error is None

    def positives(self) -> np.ndarray | None:
        """Boolean call per finding at the head's thresholds (None for regression/survival outputs)."""
        if self.probabilities is None or self.task not in CALL_TASKS:
            return None
        return self.probabilities >= self.thresholds

    def positive_findings(self) -> list[str]:
        """Names of the findings called positive (probability >= the head's threshold), in the head's finding
        order; empty for an unreadable image or a regression/survival head."""
        pos = self.positives()
        return [] if pos is None else [n for n, b in zip(self.findings, pos) if b]

    def ranked(self, top_k: int | None = None) -> list[int]:
        """Finding indices by decreasing probability (the first `top_k` when given)."""
        if self.probabilities is None:
            return []
        order = [int(i) for i in np.argsort(-self.probabilities, kind="stable")]
        return order if top_k is None else order[:top_k]

    def findings_list(self) -> list[dict[str, Any]]:
        """[{"name", "probability", "threshold", "positive", "threshold_rule", "threshold_reason"}] in the head's
        finding order (the rule that chose each threshold: chexfound.stats.thresholds)."""
        if self.probabilities is None:
            return []
        pos = self.positives()
        rules = self.threshold_rules or [{} for _ in self.findings]
        return [
            {
                "name": name,
                "probability": float(self.probabilities[i]),
                "threshold": float(self.thresholds[i]),
                "positive": None if pos is None else bool(pos[i]),
                "threshold_rule": rules[i].get("rule"),
                "threshold_reason": rules[i].get("reason"),
            }
            for i, name in enumerate(self.findings)
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: {"path", "findings": `findings_list()`, "positive": `positive_findings()`}, or
        {"path", "error"} for an unreadable image. Attention maps and the view are left out (large arrays)."""
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "findings": self.findings_list(), "positive": self.positive_findings()}
