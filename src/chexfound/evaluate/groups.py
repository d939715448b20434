"""Prevalence groups (head / medium / tail) from *training-set* label frequencies, CXR-LT style.

Long-tailed CXR benchmarks report means over frequent ("head"), intermediate ("medium") and rare ("tail")
findings. The paper does not state its cut-offs, so they are configurable; the default bins by the share of
labelled training images that are positive: head > 10 %, 1 % < medium <= 10 %, tail <= 1 %.
`by="count"` bins by the number of positive training images instead (e.g. thresholds (1000, 100)).
Groups are fixed from the training set and never from test labels (that would leak).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

GROUP_NAMES = ("head", "medium", "tail")


@dataclass(frozen=True)
class GroupConfig:
    by: Literal["frequency", "count"] = "frequency"
    head: float = 0.10  # strictly above -> head
    tail: float = 0.01  # at or below -> tail

    def __post_init__(self) -> None:
        if self.by not in ("frequency", "count"):
            raise ValueError(f"group 'by' must be 'frequency' or 'count', got {self.by!r}")
        if not self.head > self.tail:
            raise ValueError(f"head threshold {self.head} must be above tail threshold {self.tail}")

    def to_dict(self) -> dict[str, Any]:
        """The grouping as JSON values, with the rule in words."""
        return {"by": self.by, "head": self.head, "tail": self.tail,
                "rule": f"head: {self.by} > {self.head}; medium: {self.tail} < {self.by} <= {self.head}; "
                        f"tail: {self.by} <= {self.tail} (training set)"}


def training_frequencies(y_train: np.ndarray, findings: Sequence[str]) -> dict[str, dict[str, float]]:
    """Positives and frequency (positives / labelled) per finding; NaN labels are not counted."""
    y = np.asarray(y_train, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    out = {}
    for c, f in enumerate(findings):
        col = y[:, c]
        labelled = int(np.sum(~np.isnan(col)))
        pos = int(np.sum(col == 1))
        out[f] = {"n_pos": pos, "n_labelled": labelled, "frequency": pos / labelled if labelled else 0.0}
    return out


def prevalence_groups(
    y_train: np.ndarray, findings: Sequence[str], cfg: GroupConfig = GroupConfig()
) -> dict[str, list[str]]:
    """{"head": [...], "medium": [...], "tail": [...]} in finding order."""
    freq = training_frequencies(y_train, findings)
    groups: dict[str, list[str]] = {g: [] for g in GROUP_NAMES}
    for f in findings:
        v = freq[f]["frequency"] if cfg.by == "frequency" else freq[f]["n_pos"]
        g = "head" if v > cfg.head else ("tail" if v <= cfg.tail else "medium")
        groups[g].append(f)
    return groups


def group_means(per_finding: dict[str, dict[str, Any]], groups: dict[str, list[str]],
                keys: Sequence[str] = ("auroc", "ap")) -> dict[str, dict[str, Any]]:
    """Unweighted means of eligible findings in each group (NaN for a group with none)."""
    out: dict[str, dict[str, Any]] = {}
    for g, names in groups.items():
        ok = [n for n in names if n in per_finding and per_finding[n].get("eligible", True)
              and not np.isnan(per_finding[n].get("auroc", np.nan))]
        out[g] = {"findings": list(names), "n_eligible": len(ok)}
        for k in keys:
            out[g][k] = float(np.mean([per_finding[n][k] for n in ok])) if ok else float("nan")
    return out
