"""A head's post-hoc calibrator as plain tensors: logits -> calibrated probabilities (exportable to ONNX).

Per finding c of a multilabel/binary head (the choices come from `chexfound.stats.recalibration`):
    affine      p = sigmoid(scale[c] * z + bias[c])    (none: 1, 0; temperature T: 1/T, 0; platt: a, b)
    isotonic    p = y_0 + sum_k slope[c, k] * clamp(sigmoid(z) - x[c, k], 0, x[c, k+1] - x[c, k])
                (piecewise-linear through the knots (x, y); a sum of ramps, so no gather/searchsorted op)
    out[c] = isotonic[c] ? isotonic : affine
A multiclass head: softmax(scale * z) with one scale (1 / temperature) for every class.

In a head file: tensors `calibration.scale`, `calibration.bias`, `calibration.isotonic` [C] and
`calibration.knots_x`, `calibration.knots_y` [C, K], with metadata["calibration"] = {"task", "n_knots",
"methods", "rule", "findings": [per-finding choice and evidence]}. No pickle.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn


class Calibrator(nn.Module):
    def __init__(self, n_findings: int, n_knots: int = 2, task: str = "multilabel") -> None:
        super().__init__()
        self.task = task
        self.register_buffer("scale", torch.ones(n_findings))
        self.register_buffer("bias", torch.zeros(n_findings))
        self.register_buffer("isotonic", torch.zeros(n_findings))
        self.register_buffer("knots_x", torch.linspace(0, 1, max(2, n_knots)).repeat(n_findings, 1))
        self.register_buffer("knots_y", torch.linspace(0, 1, max(2, n_knots)).repeat(n_findings, 1))

    @classmethod
    def from_choices(cls, choices: Sequence[Any], task: str = "multilabel") -> "Calibrator":
        """From `chexfound.stats.recalibration.CalibrationChoice` records (binary/multilabel), in finding order."""
        k = max([len(c.knots_x) for c in choices if c.method == "isotonic"] + [2])
        cal = cls(len(choices), k, task)
        for i, c in enumerate(choices):
            if c.method in ("temperature", "platt"):
                cal.scale[i], cal.bias[i] = float(c.scale), float(c.bias)
            elif c.method == "isotonic":
                x = list(c.knots_x) + [1.0] * (k - len(c.knots_x))  # padding: zero-width segments at x = 1
                y = list(c.knots_y) + [float(c.knots_y[-1])] * (k - len(c.knots_y))
                cal.isotonic[i] = 1.0
                cal.knots_x[i] = torch.tensor(x, dtype=torch.float32)
                cal.knots_y[i] = torch.tensor(y, dtype=torch.float32)
        return cal

    @classmethod
    def multiclass(cls, n_classes: int, temperature: float) -> "Calibrator":
        cal = cls(n_classes, 2, "multiclass")
        cal.scale.fill_(1.0 / float(temperature))
        return cal

    def forward(self, logits: Tensor) -> Tensor:
        if self.task == "multiclass":
            return (logits * self.scale).softmax(-1)
        affine = torch.sigmoid(logits * self.scale + self.bias)
        p = torch.sigmoid(logits).unsqueeze(-1)  # [..., C, 1]
        x0, x1 = self.knots_x[:, :-1], self.knots_x[:, 1:]
        width = x1 - x0
        slope = torch.where(width > 0, (self.knots_y[:, 1:] - self.knots_y[:, :-1]) / width.clamp_min(1e-12),
                            torch.zeros_like(width))
        ramp = torch.minimum(torch.relu(p - x0), width)
        iso = self.knots_y[:, 0] + (slope * ramp).sum(-1)
        return torch.where(self.isotonic > 0.5, iso, affine)


def calibrator_from_meta(meta: dict[str, Any], n_findings: int) -> Calibrator:
    """An empty calibrator of the shape a head file's metadata["calibration"] records (tensors loaded after)."""
    return Calibrator(n_findings, int(meta.get("n_knots", 2)), str(meta.get("task", "multilabel")))
