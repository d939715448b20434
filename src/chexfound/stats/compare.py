"""Compute a `Comparison` (chexfound.stats.comparison): macro AUROC with patient-level CIs for every model and
paired differences model - reference on the same resamples.

The pretraining probes' final comparison (teacher vs its iteration-0 weights vs random inits vs pixels) is
this computation; `evaluate`'s compare protocol and the demo build the same `Comparison` from their own model
metrics with `paired_difference`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from chexfound.stats.bootstrap import bootstrap_multilabel, paired_bootstrap
from chexfound.stats.comparison import Comparison, ModelResult, PairedDifference
from chexfound.stats.multilabel import EligibilityRule, multilabel_metrics
from chexfound.stats.resample import BootstrapConfig, cluster_index


def paired_difference(
    y: np.ndarray,
    model: tuple[str, np.ndarray],
    reference: tuple[str, np.ndarray],
    findings: Sequence[str],
    groups: Sequence[Any] | np.ndarray | None,
    cfg: BootstrapConfig = BootstrapConfig(),
    rule: EligibilityRule = EligibilityRule(),
    subsets: Mapping[str, Sequence[str]] | None = None,
) -> PairedDifference:
    """(name, scores) of a model and of its reference on the same rows -> model - reference (macro AUROC/AP,
    per finding, per subset) from the paired patient-level bootstrap."""
    return PairedDifference.from_bootstrap(
        model[0], reference[0], paired_bootstrap(y, model[1], reference[1], findings, groups, cfg, rule, subsets))


def compare_scores(
    y: np.ndarray,
    scores: Mapping[str, np.ndarray],
    findings: Sequence[str],
    groups: Sequence[Any] | np.ndarray | None,
    reference: str | None = None,
    cfg: BootstrapConfig = BootstrapConfig(),
    pairs: Sequence[tuple[str, str]] | None = None,
) -> Comparison:
    """y [N, C] (NaN = unlabelled), scores {model: [N, C]} on the same rows, groups = patient ids (None: each
    row its own patient). Every model gets its macro AUROC with a bootstrap CI; `pairs` [(model, reference)]
    get paired differences model - reference (default: every other model minus `reference`). The CI level is
    `cfg.ci` (comparison.bootstrap["ci"])."""
    if pairs is None:
        if reference is None:
            raise ValueError("compare_scores needs a reference or explicit pairs")
        if reference not in scores:
            raise ValueError(f"reference {reference!r} is not one of the models {list(scores)}")
        pairs = [(name, reference) for name in scores if name != reference]
    for m, r in pairs:
        if m not in scores or r not in scores:
            raise ValueError(f"pair {m!r} - {r!r}: both must be among the models {list(scores)}")
    y = np.asarray(y, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    s = {k: np.asarray(v, dtype=np.float64).reshape(y.shape) for k, v in scores.items()}
    models: dict[str, ModelResult] = {}
    for name, p in s.items():
        point = multilabel_metrics(y, p, findings)["macro"]["auroc"]
        ci = bootstrap_multilabel(y, p, findings, groups, cfg=cfg)["macro"]["auroc_ci"] if cfg.n_boot else [np.nan] * 2
        models[name] = ModelResult(float(point), (float(ci[0]), float(ci[1])))
    _, n_clusters = cluster_index(groups if cfg.level == "patient" else None, len(y))
    comp = Comparison(list(findings), models, reference=reference,
                      bootstrap={"n_boot": cfg.n_boot, "ci": cfg.ci, "seed": cfg.seed, "level": cfg.level,
                                 "n_clusters": n_clusters,
                                 "unit": "patients" if groups is not None and cfg.level == "patient" else "images"})
    if cfg.n_boot:
        for m, r in pairs:
            comp.add(paired_difference(y, (m, s[m]), (r, s[r]), findings, groups, cfg))
    return comp
