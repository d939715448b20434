"""Evaluation: metrics with patient-level CIs, the paper's protocols, reports.

    from chexfound.evaluate import multilabel_metrics, bootstrap_multilabel, paired_bootstrap
    m = multilabel_metrics(y, p, findings, thresholds)             # NaN labels masked; macro/micro rule in m["rule"]
    ci = bootstrap_multilabel(y, p, findings, patient_ids)         # resamples patients, not images
    d = paired_bootstrap(y, p_a, p_b, findings, patient_ids)        # A - B on the same resamples

Modules: metrics / ranking (AUROC, AP, thresholds, regression, C-index, multiclass), bootstrap, groups
(head/medium/tail), localisation (boxes, pointing game, attention mass, centre prior), tasks (dataset task
definitions), trainers / adapt_bridge (the head-training step of the protocols), protocols/ (compare, label
efficiency, OOD, localisation), figures + report (metrics.json, report.md/html), score / score_kinds (scoring a
predictions file), pipeline (what `chexfound evaluate` runs).
"""

from chexfound.evaluate.bootstrap import BootstrapConfig, bootstrap_multilabel, paired_bootstrap
from chexfound.evaluate.groups import GroupConfig, prevalence_groups
from chexfound.evaluate.metrics import (EligibilityRule, average_precision, binary_auroc, concordance_index,
                                        multiclass_metrics, multilabel_metrics, regression_metrics,
                                        threshold_metrics)

__all__ = [
    "BootstrapConfig", "EligibilityRule", "GroupConfig", "average_precision", "binary_auroc",
    "bootstrap_multilabel", "concordance_index", "multiclass_metrics", "multilabel_metrics", "paired_bootstrap",
    "prevalence_groups", "regression_metrics", "threshold_metrics",
]
