"""When a head knows too little to call anything: the "uninformative" rule, in one place.

A finding is *uninformative* (its probability is still shown, but it is never called positive or negative)
when its validation evidence says the head cannot tell images apart:
    - no labelled validation positives or no negatives: nothing shows the head can rank this finding (and no
      threshold can be chosen: its threshold rule is "none");
    - fewer than `min_positives` (5) validation positives or negatives: an AUROC from so few says nothing;
    - validation AUROC below `min_auroc` (0.60): near-random ranking;
    - outputs that barely vary: the spread between the 95th and 5th percentile of its validation probabilities,
      on the logit scale, is below `min_logit_spread` (0.10), i.e. the head gives its most suspicious 5% of
      images at most ~10% higher odds than its least suspicious 5%. (The logit scale makes the rule the same
      for rare and common findings.)
A head is uninformative *as a whole* when none of its findings is informative. Heads whose files carry no
validation evidence (older files, the released glori.pth) are not judged (`informative` is None).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from chexfound.stats.calibration import logit
from chexfound.stats.ranking import RankedScores


@dataclass(frozen=True)
class InformativePolicy:
    min_positives: int = 5          # validation positives (and negatives) below this: too little evidence
    min_auroc: float = 0.60         # validation AUROC below this: near-random
    min_logit_spread: float = 0.10  # logit(p95) - logit(p5) of validation probabilities below this: barely varies
    spread_quantiles: tuple[float, float] = (0.05, 0.95)

    def describe(self) -> str:
        lo, hi = self.spread_quantiles
        return (f"uninformative: < {self.min_positives} validation positives or negatives, validation AUROC < "
                f"{self.min_auroc:.2f}, or "
                f"logit(p{int(hi * 100)}) - logit(p{int(lo * 100)}) of validation probabilities < "
                f"{self.min_logit_spread:g}; a head is uninformative when none of its findings is informative")


@dataclass
class FindingEvidence:
    """One finding's verdict and the numbers behind it."""

    finding: str
    informative: bool
    reasons: list[str] = field(default_factory=list)
    n_val_pos: int = 0
    n_val_neg: int = 0
    val_auroc: float = float("nan")
    logit_spread: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


def logit_spread(p: np.ndarray, quantiles: tuple[float, float] = (0.05, 0.95)) -> float:
    p = np.asarray(p, dtype=np.float64)
    p = p[np.isfinite(p)]
    if p.size == 0:
        return float("nan")
    lo, hi = np.quantile(logit(p), quantiles)
    return float(hi - lo)


def judge_finding(y: np.ndarray, p: np.ndarray, finding: str = "",
                  policy: InformativePolicy = InformativePolicy()) -> FindingEvidence:
    """The verdict for one finding from validation labels y (1/0/NaN) and (calibrated) probabilities p."""
    y, p = np.asarray(y, dtype=np.float64).ravel(), np.asarray(p, dtype=np.float64).ravel()
    lab = ~np.isnan(y) & np.isfinite(p)
    yc, pc = y[lab], p[lab]
    n_pos, n_neg = int(np.sum(yc == 1)), int(np.sum(yc == 0))
    auc = float(RankedScores(yc, pc).auroc_ap()[0][0]) if n_pos and n_neg else float("nan")
    spread = logit_spread(p, policy.spread_quantiles)
    reasons = []
    if n_pos == 0 or n_neg == 0:
        reasons.append(f"no validation {'positives' if n_pos == 0 else 'negatives'}")
    elif min(n_pos, n_neg) < policy.min_positives:
        reasons.append(f"{n_pos} validation positives / {n_neg} negatives (< {policy.min_positives}: too little "
                       "evidence)")
    elif auc < policy.min_auroc:
        reasons.append(f"validation AUROC {auc:.2f} (< {policy.min_auroc:.2f}: near-random)")
    if np.isfinite(spread) and spread < policy.min_logit_spread:
        reasons.append(f"outputs barely vary (logit spread {spread:.3g} < {policy.min_logit_spread:g})")
    return FindingEvidence(finding, not reasons, reasons, n_pos, n_neg, auc, spread)


def judge_head(y_val: np.ndarray, p_val: np.ndarray, findings: Sequence[str],
               policy: InformativePolicy = InformativePolicy()) -> dict[str, Any]:
    """{"informative": bool, "reason": str, "rule": str, "findings": [FindingEvidence dicts]} for a head from its
    validation labels [N, C] and (calibrated) probabilities [N, C]."""
    y = np.asarray(y_val, dtype=np.float64).reshape(len(y_val), -1)
    p = np.asarray(p_val, dtype=np.float64).reshape(len(p_val), -1)
    per = [judge_finding(y[:, c], p[:, c], f, policy) for c, f in enumerate(findings)]
    n_ok = sum(e.informative for e in per)
    reason = (f"{n_ok} of {len(per)} findings informative" if n_ok else
              f"none of its {len(per)} findings is informative on validation")
    return {"informative": n_ok > 0, "reason": reason, "rule": policy.describe(),
            "findings": [e.to_dict() for e in per]}
