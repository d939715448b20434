"""`Predictor.predict` takes images already in memory (CXRImage, arrays, PIL images) as well as files, in any
mix, and gives the same numbers as for the file they came from; anything else is a clear error. (Docstrings of
the public API: tests/test_public_api_docstrings.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chexfound.errors import ConfigError
from chexfound.io import read_image
from chexfound.serve import Predictor


@pytest.fixture(scope="module")
def predictor(models: dict[str, Path]) -> Predictor:
    return Predictor(models["backbone"], models["attention"], device="cpu")


@pytest.fixture
def png(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:80]
    arr = np.clip(yy * 2 + xx + rng.integers(0, 40, (96, 80)), 0, 255).astype(np.uint8)
    p = tmp_path / "cxr.png"
    Image.fromarray(arr).save(p)
    return p


def test_in_memory_images_match_their_file(predictor: Predictor, png: Path) -> None:
    ref = predictor.predict([png])[0]
    assert ref.ok
    pil = Image.open(png)
    items = [read_image(png), np.asarray(pil), pil, read_image(png).pixels, png]
    preds = predictor.predict(items, batch_size=2)
    assert len(preds) == len(items) and all(p.ok for p in preds)
    for p in preds:
        np.testing.assert_allclose(p.probabilities, ref.probabilities, atol=1e-6)
        assert p.attention is not None and p.attention.shape == ref.attention.shape
    assert preds[-1].path == str(png)  # a file keeps its path; order is the input's
    assert predictor.predict(read_image(png))[0].ok  # one image, not in a list
    assert len(predictor.predict(pil)) == 1
    assert [p.path for p in predictor.predict(x for x in [png, png])] == [str(png)] * 2  # any iterable of files


def test_other_objects_are_refused_by_name(predictor: Predictor) -> None:
    with pytest.raises(ConfigError, match="cannot predict on a dict.*file path, a CXRImage"):
        predictor.predict([{"pixels": 1}])
    with pytest.raises(ConfigError, match=r"\[H, W\] grayscale array, got shape \(4, 4, 3\)"):
        predictor.predict([np.zeros((4, 4, 3), np.uint8)])
