"""Prediction, HTTP serving and ONNX export.

`Predictor` (also `chexfound.Predictor`) runs a backbone + head on files; `chexfound.serve.app.create_app`
wraps one in the HTTP service; `chexfound.serve.export` writes ONNX / safetensors bundles.
"""

from chexfound.serve.predictor import Classifier, Prediction, Predictor

__all__ = ["Classifier", "Prediction", "Predictor"]
