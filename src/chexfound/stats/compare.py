"""A "features A vs B vs C" table: macro AUROC with patient-level CIs and paired differences to a reference.

The pretraining probes' final comparison (teacher vs random init vs pixels) is this table; the demo's
comparisons call the same `bootstrap_multilabel` / `paired_bootstrap` on the same resamples.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from chexfound.stats.bootstrap import bootstrap_multilabel, paired_bootstrap
from chexfound.stats.multilabel import multilabel_metrics
from chexfound.stats.resample import BootstrapConfig, cluster_index


def compare_scores(
    y: np.ndarray,
    scores: Mapping[str, np.ndarray],
    findings: Sequence[str],
    groups: Sequence[Any] | np.ndarray | None,
    reference: str,
    cfg: BootstrapConfig = BootstrapConfig(),
) -> dict[str, Any]:
    """y [N, C] (NaN = unlabelled), scores {model: [N, C]} on the same rows, groups = patient ids (None: each
    row its own patient). Returns {"auroc": {model: {"auroc", "ci95"}}, "paired": {"<ref>_minus_<model>":
    {"diff", "ci95", "p_value"}}, "bootstrap": {"n_boot", "ci", "level", "n_clusters", ...}}. The "ci95" key
    holds the interval at `cfg.ci` (0.95 unless changed; the key keeps its name so that probe_comparison.json
    files stay readable, and "bootstrap.ci" says the level)."""
    if reference not in scores:
        raise ValueError(f"reference {reference!r} is not one of the models {list(scores)}")
    y = np.asarray(y, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    rows: dict[str, Any] = {}
    for name, s in scores.items():
        s = np.asarray(s, dtype=np.float64).reshape(y.shape)
        point = multilabel_metrics(y, s, findings)["macro"]["auroc"]
        ci = bootstrap_multilabel(y, s, findings, groups, cfg=cfg)["macro"]["auroc_ci"] if cfg.n_boot else [np.nan] * 2
        rows[name] = {"auroc": float(point), "ci95": [float(v) for v in ci]}
    paired: dict[str, Any] = {}
    ref = np.asarray(scores[reference], dtype=np.float64).reshape(y.shape)
    for name, s in scores.items():
        if name == reference or not cfg.n_boot:
            continue
        d = paired_bootstrap(y, ref, np.asarray(s, dtype=np.float64).reshape(y.shape), findings, groups,
                             cfg=cfg)["macro"]["auroc"]
        paired[f"{reference}_minus_{name}"] = {"diff": d["diff"], "ci95": d["ci"], "p_value": d["p_value"]}
    _, n_clusters = cluster_index(groups if cfg.level == "patient" else None, len(y))
    return {"auroc": rows, "paired": paired,
            "bootstrap": {"n_boot": cfg.n_boot, "ci": cfg.ci, "seed": cfg.seed, "level": cfg.level,
                          "n_clusters": n_clusters,
                          "unit": "patients" if groups is not None and cfg.level == "patient" else "images"}}
