"""Decision thresholds: the probability at which a finding is called positive, chosen so a weak model says less.

The rules (per finding; a call is `p >= threshold`):
    "f1"          the validation score that maximises F1
    "youden"      the validation score that maximises sensitivity + specificity - 1
    "prevalence"  the (1 - prevalence) quantile of the validation scores, so the head calls about as many
                  images positive as the training set has positives (prevalence from the training labels
                  when given, else from the validation labels)
    "default"     0.5, only when there are no validation scores at all
    "none"        no threshold (NaN: the finding is never called) when the labelled validation images include no
                  positive or no negative

`choose_thresholds(method="f1" | "youden")` uses the validation-optimal rule only where the validation
evidence is strong: at least `min_positives` (10) labelled validation positives and as many negatives, and a
validation AUROC of at least `min_auroc` (0.70). Otherwise, and when the optimum calls essentially every image
positive (a threshold at or below the 1st percentile of the validation scores), the finding falls back to
"prevalence", and its record says why. The reason: the F1 of calling everything positive, 2p / (1 + p), is
hard for a near-random ranker to beat, so F1-optimal thresholds of a weak model degenerate to "all positive".
Whatever the rule, a threshold is flagged degenerate (a warning in its record and the log) when it calls
every validation image positive (at or below the 1st percentile of the scores) or more than twice the
prevalence of them; only with at least 20 validation images, below which call rates are too coarse.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from chexfound.stats.ranking import RankedScores, label_score_columns

log = logging.getLogger(__name__)

METHODS = ("f1", "youden", "prevalence")


@dataclass(frozen=True)
class ThresholdPolicy:
    """When validation evidence is strong enough to trust a validation-optimal threshold."""

    min_positives: int = 10     # labelled validation positives (and negatives) needed
    min_auroc: float = 0.70     # validation AUROC below this counts as near-random
    degenerate_ratio: float = 2.0  # calls above this multiple of the prevalence are flagged
    all_positive_quantile: float = 0.01  # an optimum at/below this score quantile calls (nearly) everything
    min_images_to_flag: int = 20  # fewer validation images: call rates are too coarse to flag a threshold

    def describe(self) -> str:
        """The policy in words (what reports print)."""
        return (f"validation-optimal only with >= {self.min_positives} validation positives and negatives and "
                f"validation AUROC >= {self.min_auroc:.2f}, else the training-prevalence quantile")


@dataclass
class ThresholdChoice:
    """One finding's threshold and the evidence behind it (what head files, run logs and predictions show)."""

    finding: str
    threshold: float
    rule: str                  # f1 | youden | prevalence | default
    reason: str                # why this rule, in words
    n_val: int                 # labelled validation images
    n_val_pos: int
    val_auroc: float           # NaN without both classes
    prevalence: float          # the reference prevalence (training when known)
    prevalence_source: str     # training | validation | none
    val_call_rate: float       # share of validation images called positive at this threshold
    warnings: list[str] = field(default_factory=list)

    @property
    def degenerate(self) -> bool:
        """Whether the choice came with `warnings` (a threshold at the edge of the scores, a call rate far from the
        prevalence)."""
        return bool(self.warnings)

    def to_dict(self) -> dict[str, Any]:
        """The choice as JSON values (NaN -> None)."""
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}

    def describe(self) -> str:
        """The rule and why it was taken, in words."""
        return f"{self.rule} ({self.reason})"


def thresholds_of(choices: Sequence[ThresholdChoice]) -> np.ndarray:
    return np.array([c.threshold for c in choices], dtype=np.float64)


def label_prevalence(y: np.ndarray) -> np.ndarray:
    """Positives / labelled per column (NaN = unlabelled); NaN for a column without labels."""
    y = np.asarray(y, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    lab = ~np.isnan(y)
    n = lab.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(y == 1, axis=0) / np.maximum(n, 1), np.nan)


def _sweep(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Scores in descending order at the end of each tie group, with cumulative TP/FP there; and n_pos."""
    order = np.argsort(-p, kind="stable")
    ys, ps = y[order], p[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(1 - ys)
    last = np.r_[ps[1:] != ps[:-1], True]  # evaluate only at the end of each tie group
    return ps[last], tp[last], fp[last], float(ys.sum())


def _optimal_thresholds(y: np.ndarray, p: np.ndarray, default: float,
                        objective: Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]) -> np.ndarray:
    """Per column, the score (predict positive when p >= t) maximising objective(tp, fp, n_pos, n_neg) over the
    labelled rows (the highest such score on ties); `default` for a column without both classes."""
    y, p = np.atleast_2d(y.T).T, np.atleast_2d(p.T).T
    out = np.full(y.shape[1], default, dtype=np.float64)
    for c in range(y.shape[1]):
        m = ~np.isnan(y[:, c]) & ~np.isnan(p[:, c])
        yc, pc = y[m, c], p[m, c]
        if yc.sum() == 0 or yc.sum() == yc.size:
            continue
        ts, tp, fp, n_pos = _sweep(yc, pc)
        out[c] = float(ts[int(np.argmax(objective(tp, fp, n_pos, yc.size - n_pos)))])
    return out


def best_f1_thresholds(y: np.ndarray, p: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per column, the score threshold that maximises F1 = 2 TP / (2 TP + FP + FN) on labelled rows."""
    return _optimal_thresholds(y, p, default, lambda tp, fp, n_pos, n_neg: 2 * tp / (tp + fp + n_pos))


def youden_thresholds(y: np.ndarray, p: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per column, the score threshold that maximises sensitivity + specificity - 1 (Youden's J)."""
    return _optimal_thresholds(y, p, default, lambda tp, fp, n_pos, n_neg: tp / n_pos - fp / n_neg)


def prevalence_threshold(scores: np.ndarray, prevalence: float) -> float:
    """The score above which a `prevalence` share of `scores` lies: the (1 - prevalence) quantile.
    No positives expected -> just above the highest score (float32-safe: heads store thresholds in float32)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return 0.5
    if prevalence <= 0:
        return float(np.nextafter(np.float32(s.max()), np.float32(np.inf)))
    if prevalence >= 1:
        return float(s.min())
    return float(np.quantile(s, 1.0 - prevalence))


def choose_thresholds(
    y_val: np.ndarray,
    p_val: np.ndarray,
    method: str = "f1",
    prevalence: Sequence[float] | np.ndarray | None = None,
    findings: Sequence[str] | None = None,
    policy: ThresholdPolicy = ThresholdPolicy(),
) -> list[ThresholdChoice]:
    """One `ThresholdChoice` per column of validation labels y_val [N, C] (NaN = unlabelled) and scores
    p_val [N, C]. `prevalence` [C]: the training prevalence (NaN entries fall back to validation labels)."""
    if method not in METHODS:
        raise ValueError(f"unknown threshold method {method!r}; use one of {METHODS}")
    y, p = label_score_columns(y_val, p_val, "validation labels", "scores")
    n_cols = y.shape[1]
    names = list(findings) if findings is not None else [str(c) for c in range(n_cols)]
    if len(names) != n_cols:
        raise ValueError(f"{n_cols} columns for {len(names)} findings")
    train_prev = (np.full(n_cols, np.nan) if prevalence is None
                  else np.asarray(prevalence, dtype=np.float64).reshape(-1))
    if train_prev.size != n_cols:
        raise ValueError(f"{train_prev.size} prevalences for {n_cols} columns")
    val_prev = label_prevalence(y) if len(y) else np.full(n_cols, np.nan)
    optimal = {"f1": best_f1_thresholds, "youden": youden_thresholds}.get(method)
    out = []
    for c in range(n_cols):
        lab = ~np.isnan(y[:, c]) & ~np.isnan(p[:, c])
        yc, pc = y[lab, c], p[lab, c]
        scores = p[:, c][np.isfinite(p[:, c])]
        n_pos, n_neg = int(np.sum(yc == 1)), int(np.sum(yc == 0))
        auc = float(RankedScores(yc, pc).auroc_ap()[0][0]) if len(yc) else float("nan")
        if np.isfinite(train_prev[c]):
            prev, source = float(train_prev[c]), "training"
        elif np.isfinite(val_prev[c]):
            prev, source = float(val_prev[c]), "validation"
        else:
            prev, source = float("nan"), "none"
        rule, reason = method, ""
        if scores.size == 0:
            thr, rule, reason = 0.5, "default", "no validation scores"
        elif lab.any() and (n_pos == 0 or n_neg == 0):
            # Nothing shows the head can separate this finding: no threshold, no call (never a degenerate one).
            thr, rule = float("nan"), "none"
            reason = f"no validation {'positives' if n_pos == 0 else 'negatives'}: no call"
        elif optimal is None:
            thr, reason = prevalence_threshold(scores, prev if np.isfinite(prev) else 0.5), "requested"
        else:
            weak = []
            if min(n_pos, n_neg) < policy.min_positives:
                weak.append(f"{n_pos} validation positives / {n_neg} negatives (< {policy.min_positives})")
            elif not auc >= policy.min_auroc:
                weak.append(f"validation AUROC {auc:.2f} (< {policy.min_auroc:.2f}: near-random)")
            thr = float(optimal(yc[:, None], pc[:, None])[0]) if not weak else float("nan")
            if not weak and np.mean(scores >= thr) >= 1.0 - policy.all_positive_quantile:
                weak.append(f"the {method} optimum calls every validation image positive")
            if weak or not np.isfinite(prev):
                if not np.isfinite(prev):
                    thr, rule, reason = 0.5, "default", "no labels to estimate a prevalence from"
                else:
                    thr, rule = prevalence_threshold(scores, prev), "prevalence"
                    reason = weak[0]
            else:
                reason = f"{n_pos} validation positives, validation AUROC {auc:.2f}"
        calls = float(np.mean(scores >= thr)) if scores.size else float("nan")
        ch = ThresholdChoice(names[c], float(thr), rule, reason, int(lab.sum()), n_pos, auc, prev, source, calls)
        if scores.size >= policy.min_images_to_flag:
            if calls >= 1.0 - policy.all_positive_quantile and prev < 0.9:
                ch.warnings.append(f"threshold {thr:.3g} is at or below the 1st percentile of the validation scores "
                                   "(every image is called positive)")
            elif np.isfinite(prev) and prev > 0 and calls > policy.degenerate_ratio * prev:
                ch.warnings.append(f"calls {calls:.0%} of validation images positive; the {source} prevalence is "
                                   f"{prev:.0%}")
        for w in ch.warnings:
            log.warning("threshold for %s (%s): %s", ch.finding, ch.rule, w)
        out.append(ch)
    fell_back = [c.finding for c in out if c.rule != method]
    if fell_back and optimal is not None:
        log.debug("thresholds: %d of %d findings use the prevalence rule instead of %s (weak validation evidence): "
                 "%s", len(fell_back), len(out), method, ", ".join(fell_back))
    return out
