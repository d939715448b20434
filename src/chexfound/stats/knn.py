"""Weighted k-NN scores on features (DINO's k-NN evaluation), NaN labels masked."""

from __future__ import annotations

import numpy as np


def knn_scores(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, k: int = 20, t: float = 0.07) -> np.ndarray:
    """Cosine similarity; the k nearest training rows vote with weights exp(sim / t). Returns [n_test, C]: the
    weighted share of positive votes among the neighbours labelled for that column; NaN where none of the k is
    labelled for it (no vote is not a negative vote: metrics mask NaN scores)."""
    a = ftr / np.linalg.norm(ftr, axis=1, keepdims=True).clip(1e-12)
    b = fte / np.linalg.norm(fte, axis=1, keepdims=True).clip(1e-12)
    sim = b @ a.T
    k = min(k, a.shape[0])
    nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, nn, axis=1) / t)
    out = np.full((fte.shape[0], ytr.shape[1]), np.nan)
    for c in range(ytr.shape[1]):
        y = np.nan_to_num(ytr[:, c], nan=0.0)[nn]
        lab = (~np.isnan(ytr[:, c]))[nn]
        with np.errstate(invalid="ignore"):  # 0 / 0 -> NaN: no labelled neighbour (every weight is > 0)
            out[:, c] = (w * y * lab).sum(1) / (w * lab).sum(1)
    return out
