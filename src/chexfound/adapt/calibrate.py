"""After training, on the validation split: fit the post-hoc calibrator, then choose thresholds on the calibrated
scores, then judge whether the head is informative. One function, used by grid training and end-to-end
fine-tuning alike, so every head `adapt` writes went through the same three rules:

    calibrator   chexfound.stats.recalibration (temperature / Platt / strictly monotone isotonic per finding, one
                 temperature per multiclass head; chosen by cross-validated validation log-loss, none when
                 validation is too small)
    thresholds   chexfound.stats.thresholds, on the calibrated validation probabilities
    informative  chexfound.stats.informative (near-random validation AUROC, outputs that barely vary, no
                 validation positives)
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from chexfound.adapt.heads.base import Head
from chexfound.adapt.heads.calibration import Calibrator
from chexfound.stats.calibration import calibration_metrics
from chexfound.stats.informative import InformativePolicy, judge_head
from chexfound.stats.recalibration import (CalibrationPolicy, apply_binary, choose_calibrators,
                                           choose_multiclass_temperature)
from chexfound.stats.thresholds import choose_thresholds

log = logging.getLogger(__name__)


def calibrate_head(head: Head, y_val: np.ndarray, p_val: np.ndarray, threshold_method: str = "f1",
                   train_prevalence: Sequence[float] | np.ndarray | None = None,
                   policy: CalibrationPolicy = CalibrationPolicy(),
                   informative: InformativePolicy = InformativePolicy()) -> np.ndarray:
    """Install a calibrator, thresholds and the informative verdict on `head` from validation labels y_val
    ([N, C] 1/0/NaN; class indices [N] for multiclass) and the head's uncalibrated probabilities p_val [N, C]
    (rows of unreadable images NaN). Returns the calibrated validation probabilities."""
    p = np.asarray(p_val, dtype=np.float64)
    ok = np.isfinite(p).all(1)
    out = p.copy()
    if head.task == "multiclass":
        t = np.asarray(y_val, dtype=np.float64).reshape(-1)
        ch = choose_multiclass_temperature(t[ok], p[ok], policy)
        head.set_calibration(Calibrator.multiclass(len(head.findings), ch["temperature"]),
                             {"rule": policy.describe(), "methods": [ch["method"]] * len(head.findings),
                              "head": ch})
        z = np.log(np.clip(p[ok], 1e-6, 1)) / ch["temperature"]
        e = np.exp(z - z.max(1, keepdims=True))
        out[ok] = e / e.sum(1, keepdims=True)
        log.info("calibration: %s (%s)", ch["method"], ch["reason"])
        return out
    if head.task not in ("multilabel", "binary"):
        return out
    y = np.asarray(y_val, dtype=np.float64).reshape(len(p), -1)
    choices = choose_calibrators(y[ok], p[ok], head.findings, policy)
    for c, ch in enumerate(choices):
        out[ok, c] = apply_binary(ch, p[ok, c])
    before = [_finite(calibration_metrics(y[ok, c], p[ok, c])) for c in range(p.shape[1])]
    after = [_finite(calibration_metrics(y[ok, c], out[ok, c])) for c in range(p.shape[1])]
    head.set_calibration(Calibrator.from_choices(choices, head.task), {
        "rule": policy.describe(), "methods": [c.method for c in choices],
        "findings": [{**c.to_dict(), "val_before": b, "val_after": a} for c, b, a in zip(choices, before, after)]})
    head.set_thresholds(choose_thresholds(y[ok], out[ok], threshold_method, train_prevalence, head.findings))
    verdict = judge_head(y[ok], out[ok], head.findings, informative)
    head.informative = verdict
    counts = {m: sum(c.method == m for c in choices) for m in dict.fromkeys(c.method for c in choices)}
    log.info("calibration on validation: %s", ", ".join(f"{n} {m}" for m, n in counts.items()))
    bad = [f for f in verdict["findings"] if not f["informative"]]
    if not verdict["informative"]:
        kinds = {"no validation": "no validation positives", "too little": "too little evidence",
                 "near-random": "near-random", "barely vary": "outputs barely vary"}
        counts = {label: sum(any(k in r for r in f["reasons"]) for f in bad) for k, label in kinds.items()}
        log.warning("this head is uninformative: %s (%s); its findings will not be called positive or negative",
                    verdict["reason"], ", ".join(f"{n} {label}" for label, n in counts.items() if n))
    elif bad:
        log.warning("%d of %d findings are uninformative and will not be called: %s", len(bad), len(choices),
                    ", ".join(f"{f['finding']} ({'; '.join(f['reasons'])})" for f in bad))
    return out


def _finite(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if np.isfinite(v) else None) for k, v in d.items()}


def calibration_table(head: Head) -> list[dict[str, Any]]:
    """Per finding: calibrator, validation Brier/ECE before and after, informative verdict (for adapt's tables)."""
    info = head.calibration_info or {}
    ev = {e["finding"]: e for e in (head.informative or {}).get("findings", [])}
    rows = []
    for f in info.get("findings", []):
        b, a = f.get("val_before", {}), f.get("val_after", {})
        e = ev.get(f["finding"], {})
        rows.append({"finding": f["finding"], "calibration": f["method"], "calibration_reason": f.get("reason", ""),
                     "val_brier_before": b.get("brier"), "val_brier_after": a.get("brier"),
                     "val_ece_before": b.get("ece"), "val_ece_after": a.get("ece"),
                     "informative": e.get("informative"), "uninformative_reason": "; ".join(e.get("reasons", []))})
    return rows
