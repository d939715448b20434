"""The statistics layer: every number the project reports about scores comes from here.

A leaf package (numpy, scipy, scikit-learn, torch; nothing from chexfound above `errors`), used by the
pretraining probes, adapt, evaluate and the demo, so every "pretrained vs random vs pixels" table is the same
computation.

    ranking      AUROC / AP (scikit-learn's definitions, NaN labels masked), weighted, for many resamples at once
    multilabel   per-finding + macro/micro metrics, the eligibility rule, calls at a threshold
    multiclass, regression, concordance   the other task types (one C-index, one return type)
    resample     the patient-level (cluster) bootstrap resampler, percentile CIs
    bootstrap    multi-label CIs and paired differences on the same patient resamples
    comparison   the one comparison result (Comparison: models, paired differences model - reference) and
                 its reader (read_comparisons, old probe_comparison.json files included)
    compare      computing one: macro AUROC + CIs per model, paired differences model - reference
    logistic     the logistic probe (one fitter, one documented regularisation search)
    thresholds   decision thresholds, with a prevalence fallback when validation evidence is weak
    knn          DINO's weighted k-NN scores
    pixels       the 32x32 raw-pixel baseline's features
"""

from chexfound.stats.bootstrap import bootstrap_multilabel, paired_bootstrap
from chexfound.stats.compare import compare_scores, paired_difference
from chexfound.stats.comparison import (DIFFERENCE, Comparison, Difference, ModelResult, PairedDifference,
                                        pair_name, read_comparisons)
from chexfound.stats.concordance import Concordance, concordance_index
from chexfound.stats.knn import knn_scores
from chexfound.stats.logistic import C_GRID, LogisticProbe, LogisticTrainer, fit_logistic, fit_probe
from chexfound.stats.multiclass import multiclass_metrics
from chexfound.stats.multilabel import EligibilityRule, multilabel_metrics, threshold_metrics
from chexfound.stats.pixels import pixel_features, pixel_vector
from chexfound.stats.ranking import RankedScores, average_precision, binary_auroc
from chexfound.stats.regression import regression_metrics
from chexfound.stats.resample import (BootstrapConfig, bias_corrected_ci, bootstrap_statistic, percentile_ci,
                                      resample_weights, widened_percentile_ci)
from chexfound.stats.thresholds import ThresholdChoice, ThresholdPolicy, choose_thresholds, label_prevalence

__all__ = [
    "BootstrapConfig", "C_GRID", "Comparison", "Concordance", "DIFFERENCE", "Difference", "EligibilityRule",
    "ModelResult", "PairedDifference", "pair_name", "paired_difference", "read_comparisons", "LogisticProbe", "LogisticTrainer",
    "RankedScores", "ThresholdChoice", "ThresholdPolicy", "average_precision", "binary_auroc",
    "bootstrap_multilabel", "bootstrap_statistic", "choose_thresholds", "compare_scores", "concordance_index",
    "fit_logistic", "fit_probe", "knn_scores", "label_prevalence", "multiclass_metrics", "multilabel_metrics",
    "paired_bootstrap", "percentile_ci", "pixel_features", "pixel_vector", "regression_metrics",
    "resample_weights", "threshold_metrics", "bias_corrected_ci", "widened_percentile_ci",
]
