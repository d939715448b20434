"""Evaluation: metrics with patient-level CIs, the paper's protocols, reports.

    from chexfound.evaluate import multilabel_metrics, bootstrap_multilabel, paired_bootstrap
    m = multilabel_metrics(y, p, findings, thresholds)             # NaN labels masked; macro/micro rule in m["rule"]
    ci = bootstrap_multilabel(y, p, findings, patient_ids)         # resamples patients, not images
    d = paired_bootstrap(y, p_a, p_b, findings, patient_ids)        # A - B on the same resamples

The statistics themselves (AUROC/AP, thresholds, patient bootstrap, paired differences, C-index, the logistic
probe) live in `chexfound.stats`; the metric functions this package exported before are re-exported here
(below). Modules: groups (head/medium/tail), box_scores (boxes, pointing game, attention mass, centre prior),
tasks (dataset task definitions), trainers (the head-training step of the protocols: the stats logistic probe,
the adapt heads), protocols/ (compare, label efficiency, OOD, localisation), figures + report (metrics.json,
report.md/html) + run_common (provenance, the classification figures), score (matching a predictions file to a
manifest) / score_kinds / score_run (scoring it), pipeline (what `chexfound evaluate --task` runs).
"""

from chexfound.evaluate.groups import GroupConfig, prevalence_groups
from chexfound.stats import (BootstrapConfig, EligibilityRule, average_precision, binary_auroc, bootstrap_multilabel,
                             concordance_index, multiclass_metrics, multilabel_metrics, paired_bootstrap,
                             regression_metrics, threshold_metrics)

__all__ = [
    "BootstrapConfig", "EligibilityRule", "GroupConfig", "average_precision", "binary_auroc",
    "bootstrap_multilabel", "concordance_index", "multiclass_metrics", "multilabel_metrics", "paired_bootstrap",
    "prevalence_groups", "regression_metrics", "threshold_metrics",
]
