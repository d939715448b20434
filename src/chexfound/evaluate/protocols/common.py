"""What every protocol shares: split indices, the evaluation settings and one scoring function.

`score_predictions` produces the core of every metrics.json:
{"macro": {"auroc", "ap", ..., "auroc_ci", "ap_ci", "brier", "brier_ci", "ece", "ece_ci", "cal_intercept",
           "cal_intercept_ci", "cal_slope", "cal_slope_ci"}, "micro": {...},
 "per_finding": {NAME: {"auroc", "ap", "auroc_ci", "ap_ci", "n_pos", "n_neg", "threshold", "sensitivity",
                        "specificity", "f1", ..., "brier", "brier_ci", "ece", "ece_ci", "cal_intercept",
                        "cal_intercept_ci", "cal_slope", "cal_slope_ci", "train_frequency", "group"}},
 "calibration": {"ece_bins", "definitions", "keys", "ci_method": {metric: bootstrap interval}},
 "groups": {"head"|"medium"|"tail": {"findings", "auroc", "ap", "auroc_ci", "ap_ci"}},
 "rule": ..., "eligible": [...], "excluded": [...], "bootstrap": {...}}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from chexfound.stats.bootstrap import bootstrap_multilabel
from chexfound.stats.calibration import KEYS as CALIBRATION_KEYS
from chexfound.stats.calibration import calibration_summary
from chexfound.stats.resample import BootstrapConfig
from chexfound.evaluate.groups import GroupConfig, group_means, prevalence_groups, training_frequencies
from chexfound.stats.multilabel import EligibilityRule, multilabel_metrics


@dataclass(frozen=True)
class Splits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @classmethod
    def from_labels(cls, split: Sequence[str]) -> "Splits":
        s = np.asarray(split).astype(str)
        return cls(np.flatnonzero(s == "train"), np.flatnonzero(s == "val"), np.flatnonzero(s == "test"))

    def restrict(self, keep: np.ndarray) -> "Splits":
        """Drop rows where `keep` is False (e.g. unreadable images)."""
        return Splits(self.train[keep[self.train]], self.val[keep[self.val]], self.test[keep[self.test]])


@dataclass(frozen=True)
class EvalConfig:
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    rule: EligibilityRule = field(default_factory=EligibilityRule)
    groups: GroupConfig = field(default_factory=GroupConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"bootstrap": asdict(self.bootstrap), "rule": asdict(self.rule), "groups": self.groups.to_dict()}


def score_predictions(
    y_test: np.ndarray,
    p_test: np.ndarray,
    patients_test: Sequence[Any] | np.ndarray | None,
    findings: Sequence[str],
    thresholds: Sequence[float] | np.ndarray | None = None,
    y_train: np.ndarray | None = None,
    cfg: EvalConfig = EvalConfig(),
    with_ci: bool = True,
) -> dict[str, Any]:
    findings = list(findings)
    y_test = np.asarray(y_test, dtype=np.float64)
    p_test = np.asarray(p_test, dtype=np.float64)
    y_test = y_test[:, None] if y_test.ndim == 1 else y_test
    p_test = p_test[:, None] if p_test.ndim == 1 else p_test
    out = multilabel_metrics(y_test, p_test, findings, thresholds, cfg.rule)
    groups: dict[str, list[str]] | None = None
    if y_train is not None:
        freq = training_frequencies(y_train, findings)
        groups = prevalence_groups(y_train, findings, cfg.groups)
        for g, names in groups.items():
            for f in names:
                out["per_finding"][f]["group"] = g
                out["per_finding"][f]["train_frequency"] = freq[f]["frequency"]
                out["per_finding"][f]["train_n_pos"] = freq[f]["n_pos"]
        out["groups"] = group_means(out["per_finding"], groups)
        out["group_rule"] = cfg.groups.to_dict()
    if with_ci and cfg.bootstrap.n_boot > 0:
        bs = bootstrap_multilabel(y_test, p_test, findings, patients_test, thresholds, cfg.bootstrap, cfg.rule,
                                  subsets=groups)
        for f, d in bs["per_finding"].items():
            out["per_finding"][f].update(d)
        out["macro"].update(bs["macro"])
        out["micro"].update(bs["micro"])
        for g, d in bs["subsets"].items():
            out["groups"][g].update(d)
        out["bootstrap"] = bs["config"]
    if np.all((p_test[~np.isnan(p_test)] >= 0) & (p_test[~np.isnan(p_test)] <= 1)):  # probabilities only
        cal = calibration_summary(y_test, p_test, findings, patients_test, cfg.bootstrap, cfg.rule,
                                  with_ci=with_ci and cfg.bootstrap.n_boot > 0)
        for f, d in cal["per_finding"].items():
            out["per_finding"][f].update(d)
        out["macro"].update({k: v for k, v in cal["macro"].items() if k != "n_findings"})
        out["calibration"] = {"ece_bins": cal["ece_bins"], "definitions": cal["definitions"],
                              "ci_method": cal["ci_method"],
                              "keys": list(CALIBRATION_KEYS)}
    for f in findings:  # CI keys exist for every finding (null when not eligible) so readers need no checks
        for k in ("auroc_ci", "ap_ci"):
            out["per_finding"][f].setdefault(k, [float("nan"), float("nan")])
    return out
