"""Manifests, dataset readers, patient splits, the model input transform, finding vocabularies."""
