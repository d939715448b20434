"""Prediction, HTTP serving and ONNX export."""
