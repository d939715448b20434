"""Protocol (a): several frozen backbones x heads on one task, same splits, paired comparisons.

Each model is a (trainer, feature source) pair under a label such as "tiny_vit/linear". All models are
trained on the same train rows, select on the same val rows and are scored on the same test rows; the first
model is the reference, and every other model gets a paired patient-level bootstrap of its difference to it
(model - reference, keyed "<model> - <reference>": a `chexfound.stats.Comparison`).
The top-level "macro"/"per_finding" of the result are the reference model's.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from chexfound.stats.calibration import calibration_summary
from chexfound.stats.compare import paired_difference
from chexfound.stats.comparison import Comparison, ModelResult
from chexfound.stats.multilabel import multilabel_metrics
from chexfound.evaluate.protocols.common import EvalConfig, Splits, score_predictions
from chexfound.evaluate.trainers import HeadTrainer, train_and_predict

log = logging.getLogger(__name__)


def run_compare(
    models: Mapping[str, tuple[HeadTrainer, Any]],
    y: np.ndarray,
    patients: Sequence[Any] | np.ndarray,
    splits: Splits,
    findings: Sequence[str],
    cfg: EvalConfig = EvalConfig(),
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (metrics, artefacts); artefacts["predictions"][label] = test probabilities, ["heads"][label] =
    the fitted head."""
    if not models:
        raise ValueError("no models to compare")
    y = np.asarray(y, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    pats = np.asarray(patients).astype(str)
    yt = y[splits.test]
    results: dict[str, Any] = {}
    preds: dict[str, np.ndarray] = {}
    heads: dict[str, Any] = {}
    uncal: dict[str, np.ndarray] = {}
    for label, (trainer, source) in models.items():
        log.info("compare: training %s", label)
        p, head = train_and_predict(trainer, source, y, splits.train, splits.test, splits.val, seed)
        preds[label] = p
        heads[label] = head
        res = score_predictions(yt, p, pats[splits.test], findings, head.thresholds, y[splits.train], cfg)
        res["head"] = head.info
        res["thresholds"] = dict(zip(findings, map(float, head.thresholds)))
        raw = head.predict_uncalibrated(source, splits.test) if hasattr(head, "predict_uncalibrated") else None
        if raw is not None:  # the same test images before the post-hoc calibrator (fitted on val) was applied
            res["calibration_before"] = calibration_before_after(yt, raw, p, pats[splits.test], findings, cfg,
                                                                 res)
            uncal[label] = raw
        results[label] = res
    labels = list(models)
    ref = labels[0]
    groups = {g: v["findings"] for g, v in results[ref].get("groups", {}).items()}
    comparison = Comparison(list(findings), {k: ModelResult.from_metrics(v) for k, v in results.items()},
                            bootstrap=dict(results[ref].get("bootstrap", {})), reference=ref)
    for other in labels[1:]:
        comparison.add(paired_difference(yt, (other, preds[other]), (ref, preds[ref]), findings, pats[splits.test],
                                         cfg.bootstrap, cfg.rule, subsets=groups))
    core = {k: results[ref][k] for k in ("macro", "micro", "per_finding", "eligible", "excluded", "rule")}
    for k in ("groups", "group_rule", "bootstrap", "calibration"):
        if k in results[ref]:
            core[k] = results[ref][k]
    # The comparison's keys (schema, difference, findings, reference, models, paired) beside the reference
    # model's core metrics: `chexfound.stats.read_comparisons` reads the file back.
    metrics = {"protocol": "compare", **comparison.to_dict(), **core}
    return metrics, {"predictions": preds, "heads": heads, "y_test": yt, "test_idx": splits.test,
                     "comparison": comparison, "uncalibrated": uncal}


def calibration_before_after(yt: np.ndarray, raw: np.ndarray, cal: np.ndarray, pats: np.ndarray,
                             findings: Sequence[str], cfg: EvalConfig, res: dict[str, Any]) -> dict[str, Any]:
    """Test calibration of the uncalibrated outputs (with CIs, on the same resamples as the calibrated ones in
    `res`), and the largest AUROC change the calibrator caused (0 for monotone calibrators)."""
    before = calibration_summary(yt, raw, findings, pats, cfg.bootstrap, cfg.rule,
                                 with_ci=cfg.bootstrap.n_boot > 0)
    auc_raw = multilabel_metrics(yt, raw, findings, rule=cfg.rule)["per_finding"]
    diffs = [abs(auc_raw[f]["auroc"] - res["per_finding"][f]["auroc"]) for f in findings
             if np.isfinite(auc_raw[f]["auroc"])]
    return {"macro": before["macro"], "per_finding": before["per_finding"],
            "max_abs_auroc_change": float(max(diffs)) if diffs else float("nan"),
            "note": "the same test images scored with the head's probabilities before its post-hoc calibrator"}
