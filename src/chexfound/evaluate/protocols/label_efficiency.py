"""Protocol (b): label efficiency: heads trained on 1 %, 2 %, 5 %, ... 100 % of the training *patients*.

For each fraction and seed, a seeded random subset of training patients (all their images) is drawn; the
validation patients are subsampled by the same fraction (a few-label study should not select models on a
large labelled validation set). A subset is redrawn (up to `max_tries`) until every finding that has both
classes in the full training set has at least one positive and one negative in it, when possible. The test
set is fixed. The curve reports mean and standard deviation over seeds of the macro AUROC/AP; the full
(100 %, first seed) run is scored with bootstrap CIs and becomes the top-level metrics.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from chexfound.evaluate.protocols.common import EvalConfig, Splits, score_predictions
from chexfound.evaluate.trainers import HeadTrainer, train_and_predict

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.25, 0.50, 1.0)


def _has_both(y: np.ndarray) -> np.ndarray:
    return np.array([(np.nansum(y[:, c] == 1) > 0) and (np.nansum(y[:, c] == 0) > 0) for c in range(y.shape[1])],
                    dtype=bool)


def subsample_patients(
    idx: np.ndarray, patients: np.ndarray, fraction: float, seed: int, y: np.ndarray | None = None,
    max_tries: int = 50,
) -> np.ndarray:
    """Rows of a seeded random `fraction` of the patients in `idx` (at least one patient)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    idx = np.asarray(idx)
    if fraction >= 1 or idx.size == 0:
        return idx
    pats = np.asarray(patients).astype(str)[idx]
    uniq = np.unique(pats)
    k = max(1, int(round(fraction * uniq.size)))
    rng = np.random.default_rng(seed)
    need = _has_both(y[idx]) if y is not None else None
    chosen = idx
    for _ in range(max_tries):
        pick = rng.choice(uniq, size=k, replace=False)
        chosen = idx[np.isin(pats, pick)]
        if need is None or np.all(_has_both(y[chosen])[need]):
            break
    return chosen


def run_label_efficiency(
    trainer: HeadTrainer,
    source: Any,
    y: np.ndarray,
    patients: Sequence[Any] | np.ndarray,
    splits: Splits,
    findings: Sequence[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    cfg: EvalConfig = EvalConfig(),
    subsample_val: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    y = np.asarray(y, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    pats = np.asarray(patients).astype(str)
    yt = y[splits.test]
    fractions = sorted(set(float(f) for f in fractions))
    runs = []
    full: tuple[dict[str, Any], np.ndarray] | None = None
    for frac in fractions:
        # Every seed gives the same subset at 100 %, so a single run is enough there.
        for seed in (seeds if frac < 1 else seeds[:1]):
            tr = subsample_patients(splits.train, pats, frac, seed, y)
            va = subsample_patients(splits.val, pats, frac, seed + 10_000, y) if subsample_val else splits.val
            p, head = train_and_predict(trainer, source, y, tr, splits.test, va, seed)
            is_full = frac >= 1 and full is None
            res = score_predictions(yt, p, pats[splits.test], findings, head.thresholds, y[splits.train], cfg,
                                    with_ci=is_full)
            if is_full:
                full = (res, p)
            runs.append({
                "fraction": frac, "seed": int(seed), "n_images": int(tr.size),
                "n_patients": int(np.unique(pats[tr]).size), "n_val_images": int(va.size),
                "n_pos": {f: int(np.nansum(y[tr, c] == 1)) for c, f in enumerate(findings)},
                "macro": {k: res["macro"][k] for k in ("auroc", "ap", "f1")},
                "per_finding": {f: {"auroc": res["per_finding"][f]["auroc"], "ap": res["per_finding"][f]["ap"]}
                                for f in findings},
                "head": head.info,
            })
            log.info("label efficiency: %.0f%% seed %d -> macro AUROC %.4f", frac * 100, seed, res["macro"]["auroc"])
    curve = []
    for frac in fractions:
        rs = [r for r in runs if r["fraction"] == frac]
        point: dict[str, Any] = {"fraction": frac, "n_seeds": len(rs),
                                 "n_images_mean": float(np.mean([r["n_images"] for r in rs])),
                                 "n_patients_mean": float(np.mean([r["n_patients"] for r in rs]))}
        for k in ("auroc", "ap"):
            v = np.array([r["macro"][k] for r in rs], dtype=np.float64)
            point[f"{k}_mean"] = float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan")
            point[f"{k}_std"] = float(np.nanstd(v)) if np.any(~np.isnan(v)) else float("nan")
        curve.append(point)
    assert full is not None
    res, p_full = full
    core = {k: res[k] for k in ("macro", "micro", "per_finding", "eligible", "excluded", "rule")}
    for k in ("groups", "group_rule", "bootstrap"):
        if k in res:
            core[k] = res[k]
    metrics = {"protocol": "label-efficiency", **core, "curve": curve, "runs": runs,
               "fractions": fractions, "seeds": [int(s) for s in seeds], "subsample_val": subsample_val,
               "sampling": "patients of the training (and validation) split, redrawn until every finding with "
                           "both classes keeps one positive and one negative when possible"}
    return metrics, {"predictions": {"100%": p_full}, "y_test": yt, "test_idx": splits.test}
