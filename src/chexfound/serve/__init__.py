"""Prediction, HTTP serving and ONNX export.

`Predictor` (also `chexfound.Predictor`) runs a backbone + head on files; `chexfound.serve.app.create_app`
wraps one in the HTTP service; `chexfound.serve.export` writes ONNX / safetensors bundles.
"""

from chexfound.serve.bundle import Classifier
from chexfound.serve.prediction import Prediction
from chexfound.serve.predictor import Predictor

__all__ = ["Classifier", "Prediction", "Predictor"]
