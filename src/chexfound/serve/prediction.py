"""What one image's prediction is: `Prediction` (probabilities, calls at the head's thresholds, attention).

The result type shared by `Predictor`, the prediction store of `chexfound predict` and the HTTP service; it
depends on nothing but numpy, so every serve module can use it without importing the model code.

`finding_records` is the one place where a finding's reported values are put together: the (calibrated)
probability, the calibrator that produced it, the threshold and the rule that chose it, the call, and whether
the head is informative for it (`HeadReliability`, from the head file's validation evidence:
chexfound.stats.informative). An uninformative finding, an uninformative head, or a finding without a
threshold gets no call: `positive` is None, never True or False. Every writer (CSV/JSON, the service, DICOM)
reads these records rather than recomputing calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Tasks whose outputs are probabilities that a threshold turns into a positive/negative call.
CALL_TASKS = ("multilabel", "binary", "multiclass")


@dataclass(frozen=True)
class HeadReliability:
    """What a head file says about how far its outputs can be trusted: per finding the calibrator and the
    informative verdict (None = the file carries no validation evidence), and the verdict for the head."""

    calibration: tuple[str | None, ...]
    informative: tuple[bool | None, ...]
    reasons: tuple[str, ...]
    head_informative: bool | None = None
    head_reason: str = ""

    @classmethod
    def unknown(cls, n: int) -> "HeadReliability":
        return cls((None,) * n, (None,) * n, ("",) * n)

    @classmethod
    def from_head_meta(cls, meta: dict[str, Any], findings: list[str]) -> "HeadReliability":
        """From a head file's metadata ("calibration", "informative"; chexfound.adapt.heads.base)."""
        n = len(findings)
        methods = list((meta.get("calibration") or {}).get("methods") or [None] * n)
        inf = meta.get("informative") or {}
        by_name = {e.get("finding"): e for e in inf.get("findings", [])}
        flags = tuple(by_name[f].get("informative") if f in by_name else None for f in findings)
        reasons = tuple("; ".join(by_name[f].get("reasons") or []) if f in by_name else "" for f in findings)
        return cls(tuple(methods[:n]) if len(methods) == n else (None,) * n, flags, reasons,
                   inf.get("informative"), str(inf.get("reason", "")))

    @property
    def uninformative_findings(self) -> list[int]:
        return [i for i, v in enumerate(self.informative) if v is False]

    def to_dict(self, findings: list[str]) -> dict[str, Any]:
        return {"informative": self.head_informative, "reason": self.head_reason,
                "uninformative_findings": [findings[i] for i in self.uninformative_findings]}


def finding_records(findings: list[str], probabilities: np.ndarray, thresholds: np.ndarray, task: str,
                    threshold_rules: list[dict[str, Any]] | None = None,
                    reliability: HeadReliability | None = None) -> list[dict[str, Any]]:
    """Per finding, in the head's order: {"name", "probability", "calibration", "threshold", "positive",
    "threshold_rule", "threshold_reason", "informative", "uninformative_reason"}. `positive` is None (no call)
    for outputs that are not probabilities, a finding without a threshold, and an uninformative finding or head."""
    rules = threshold_rules or [{} for _ in findings]
    rel = reliability or HeadReliability.unknown(len(findings))
    head_off = rel.head_informative is False
    out = []
    for i, name in enumerate(findings):
        t = float(thresholds[i])
        has_t = bool(np.isfinite(t))
        informative = False if head_off else rel.informative[i]
        called = task in CALL_TASKS and has_t and informative is not False
        reason = rel.reasons[i] or (rel.head_reason if head_off else "")
        out.append({
            "name": name,
            "probability": float(probabilities[i]),
            "calibration": rel.calibration[i],
            "threshold": t if has_t else None,
            "positive": bool(probabilities[i] >= t) if called else None,
            "threshold_rule": rules[i].get("rule"),
            "threshold_reason": rules[i].get("reason"),
            "informative": informative,
            "uninformative_reason": reason if informative is False else None,
        })
    return out


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
    reliability: HeadReliability | None = None  # calibrators and informative verdicts the head recorded

    @property
    def ok(self) -> bool:
        """Whether the image was read and scored (False: `error` says why not)."""
        return self.error is None

    def positives(self) -> np.ndarray | None:
        """Boolean call per finding (False also where no call is made: see `records`); None for outputs that are
        not probabilities (regression/survival)."""
        if self.probabilities is None or self.task not in CALL_TASKS:
            return None
        return np.array([r["positive"] is True for r in self.records()], dtype=bool)

    def records(self) -> list[dict[str, Any]]:
        """The per-finding records (`finding_records`): probability, calibrator, threshold, rule, call, verdict."""
        if self.probabilities is None:
            return []
        return finding_records(self.findings, self.probabilities, self.thresholds, self.task, self.threshold_rules,
                               self.reliability)

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
        """The per-finding records as dicts, in the head's finding order (see `finding_records`)."""
        return self.records()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: {"path", "findings": `findings_list()`, "positive": `positive_findings()`}, or
        {"path", "error"} for an unreadable image. Attention maps and the view are left out (large arrays)."""
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        out = {"path": self.path, "findings": self.findings_list(), "positive": self.positive_findings()}
        if self.reliability is not None and self.reliability.head_informative is False:
            out["uninformative"] = self.reliability.head_reason
        return out
