"""Evaluation protocols: (a) compare backbones x heads, (b) label efficiency, (c) OOD, (d) localisation."""

from chexfound.evaluate.protocols.common import EvalConfig, Splits, score_predictions
from chexfound.evaluate.protocols.compare import run_compare
from chexfound.evaluate.protocols.label_efficiency import run_label_efficiency, subsample_patients
from chexfound.evaluate.protocols.localisation import run_localisation
from chexfound.evaluate.protocols.ood import run_ood

__all__ = ["EvalConfig", "Splits", "score_predictions", "run_compare", "run_label_efficiency",
           "subsample_patients", "run_localisation", "run_ood"]
