"""Heatmaps: head averaging, grid placement, mapping back to the original image, overlay files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from chexfound.adapt.heatmap import attention_map, overlay_png, save_heatmaps, to_image_space
from chexfound.data.transform import InputTransform


def _one_hot(grid, r, c, heads=2):
    a = np.zeros((heads, grid * grid), dtype=np.float32)
    a[:, r * grid + c] = 1.0
    return a


def test_attention_map_averages_heads_and_places_the_peak():
    a = np.zeros((2, 16), dtype=np.float32)
    a[0, 1 * 4 + 2] = 1.0  # head 0 looks at row 1, col 2
    a[1, 3 * 4 + 0] = 0.5  # head 1 at row 3, col 0
    m = attention_map(a, normalize=False)
    assert m.shape == (4, 4) and m[1, 2] == pytest.approx(0.5) and m[3, 0] == pytest.approx(0.25)
    up = attention_map(a, size=64)
    assert up.shape == (64, 64) and up.max() == pytest.approx(1.0)
    r, c = np.unravel_index(up.argmax(), up.shape)
    assert 16 <= r < 32 and 32 <= c < 48  # inside the patch (row 1, col 2) of 16 px
    with pytest.raises(ValueError, match="square"):
        attention_map(np.ones(12))
    assert attention_map(np.ones(12), grid=(3, 4)).shape == (3, 4)


def test_to_image_space_undoes_crop_and_pad():
    # A wide 100x200 image, model input 64: crop keeps the central 100x100, pad shrinks it to 32x64 rows.
    heat = attention_map(_one_hot(4, 0, 0), size=64, normalize=False)
    crop = to_image_space(heat, (100, 200), InputTransform(size=64, mode="crop"))
    assert crop.shape == (100, 200)
    assert crop[:, :45].max() == 0 and crop[:, 155:].max() == 0  # outside the centre crop
    r, c = np.unravel_index(crop.argmax(), crop.shape)
    assert r < 25 and 50 <= c < 80  # top-left patch of the crop
    pad = to_image_space(heat, (100, 200), InputTransform(size=64, mode="pad"))
    r, c = np.unravel_index(pad.argmax(), pad.shape)
    assert pad.shape == (100, 200) and c < 50  # top-left patch of the padded square: left edge, padding cut


def test_overlay_and_save_heatmaps(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.random((80, 60)).astype(np.float32)
    tf = InputTransform(size=64)
    attn = np.stack([_one_hot(4, i, i, heads=2) for i in range(3)], axis=1)  # [heads, C=3, N]
    paths = save_heatmaps(attn, [0.2, 0.9, 0.5], ["A", "B/C", "D"], pixels, tf, tmp_path, "img 1", top_k=2)
    assert [p.name for p in paths] == ["img_1__B_C.png", "img_1__D.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.size[0] >= 64 and im.mode in ("RGBA", "RGB")
    orig = save_heatmaps(attn, [0.2, 0.9, 0.5], ["A", "B", "D"], pixels, tf, tmp_path / "o", "x", which=[0],
                         original_space=True)
    assert len(orig) == 1 and orig[0].is_file()
    with pytest.raises(ValueError, match="differ"):
        overlay_png(pixels, np.zeros((4, 4)), tmp_path / "bad.png")
