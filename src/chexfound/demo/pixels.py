"""The raw-pixel baseline: logistic regression on downsampled pixels.

A tiny, briefly pretrained ViT must be compared with this: on small sets, 32x32 pixels are a strong baseline.
"""

from __future__ import annotations

from os import PathLike
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from chexfound.errors import ChexfoundError
from chexfound.io import read_image


def pixel_features(paths: Sequence[str | PathLike[str]], size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """[N, size*size] float32 of each image resized (area) to size x size; and a validity mask."""
    out = np.zeros((len(paths), size * size), dtype=np.float32)
    ok = np.ones(len(paths), dtype=bool)
    for i, p in enumerate(paths):
        try:
            px = torch.from_numpy(read_image(p).pixels)[None, None]
        except ChexfoundError:
            ok[i] = False
            continue
        out[i] = F.interpolate(px, size=(size, size), mode="area").flatten().numpy()
    return out, ok


def fit_predict_pixels(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c: float = 0.1, seed: int = 0
) -> np.ndarray:
    """One logistic regression per label column (NaN labels masked); returns test probabilities [N, C]."""
    scaler = StandardScaler().fit(x_train)
    xtr, xte = scaler.transform(x_train), scaler.transform(x_test)
    y_train = y_train.reshape(len(y_train), -1)
    probs = np.full((len(x_test), y_train.shape[1]), np.nan, dtype=np.float32)
    for j in range(y_train.shape[1]):
        m = ~np.isnan(y_train[:, j])
        yj = y_train[m, j]
        if len(np.unique(yj)) < 2:
            probs[:, j] = float(yj.mean()) if len(yj) else 0.5
            continue
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xtr[m], yj)
        probs[:, j] = clf.predict_proba(xte)[:, 1]
    return probs
