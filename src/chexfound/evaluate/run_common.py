"""Pieces shared by the `chexfound evaluate` runs: provenance and the classification figures."""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

from chexfound import __version__
from chexfound.evaluate import figures
from chexfound.evaluate.report import Figure
from chexfound.runio import utc_now


def provenance(extra: dict[str, Any]) -> dict[str, Any]:
    """What made a report: when (ISO-8601 UTC), which chexfound, which command line, plus `extra`."""
    return {"created": utc_now(), "chexfound_version": __version__, "command": sys.argv, **extra}


def classification_figures(y: np.ndarray, preds: dict[str, np.ndarray], findings: Sequence[str],
                           metrics: dict[str, Any], groups_by_model: dict[str, Any] | None = None) -> list[Figure]:
    figs = [Figure("roc.png", "ROC curves per finding", figures.roc_pr_grid(y, preds, findings, "roc",
                                                                            metrics.get("per_finding"))),
            Figure("pr.png", "Precision-recall curves per finding",
                   figures.roc_pr_grid(y, preds, findings, "pr", metrics.get("per_finding")),
                   "Dotted line: prevalence (the AP of a random ranking).")]
    if "calibration" in metrics:
        figs.append(Figure("reliability.png", "Reliability diagrams per finding",
                           figures.reliability_grid(y, preds, findings, metrics.get("per_finding"),
                                                    metrics["calibration"].get("ece_bins", 10)),
                           f"Observed positive rate against mean predicted probability in "
                           f"{metrics['calibration'].get('ece_bins', 10)} equal-mass bins (whiskers: Wilson 95% "
                           "intervals per bin); dotted: perfect calibration; beneath: histogram of predictions."))
    gb = groups_by_model if groups_by_model is not None else (
        {"model": metrics["groups"]} if metrics.get("groups") else None)
    if gb:
        figs.append(Figure("groups.png", "Prevalence groups", figures.group_bars(gb),
                           "Whiskers: patient-level bootstrap 95% CI of the group mean."))
    return figs
