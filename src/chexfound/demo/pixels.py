"""The raw-pixel baseline's features: downsampled pixels (the demo fits `evaluate.trainers.LogisticTrainer` on them).

A tiny, briefly pretrained ViT must be compared with this: on small sets, 32x32 pixels are a strong baseline.
"""

from __future__ import annotations

from os import PathLike
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

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

