from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from chexfound.curate.hashing import (PHASH_BITS, area_resize, exact_hash, hamming_hex, hamming_words, hex_to_words,
                                      phash, words_to_bits)
from chexfound.io import read_image


@pytest.fixture(scope="module")
def nih(data_root):
    paths = sorted((data_root / "nih14" / "images").glob("*.png"))[:6]
    return [read_image(p).pixels for p in paths]


def test_exact_hash_is_about_pixels_not_files(tmp_path, nih):
    x8 = np.rint(nih[0] * 255).astype(np.uint8)
    Image.fromarray(x8).save(tmp_path / "a.png")
    Image.fromarray(x8.astype(np.uint16) * 257).save(tmp_path / "b.png")  # same image, 16-bit file
    Image.fromarray(x8).save(tmp_path / "c.tiff")
    a, b, c = (exact_hash(read_image(tmp_path / n).pixels) for n in ("a.png", "b.png", "c.tiff"))
    assert a == b == c
    y = x8.copy()
    y[100, 100] ^= 1
    assert exact_hash(y / 255.0) != exact_hash(x8 / 255.0)
    assert exact_hash(np.zeros((4, 6))) != exact_hash(np.zeros((6, 4)))  # shape is part of the content


def _jpeg(x: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.rint(x * 255).astype(np.uint8)).save(buf, format="JPEG", quality=q)
    return np.asarray(Image.open(buf), dtype=np.float32) / 255


def _resize(x: np.ndarray, w: int, h: int, f=Image.Resampling.LANCZOS) -> np.ndarray:
    return np.clip(np.asarray(Image.fromarray(x.astype(np.float32)).resize((w, h), f)), 0, 1)


def test_phash_is_robust_to_copies_and_separates_different_images(nih):
    assert len(phash(nih[0])) == PHASH_BITS // 4
    for x in nih[:4]:
        h = phash(x)
        copies = {
            "64px": _resize(x, 64, 64, Image.Resampling.BILINEAR),
            "jpeg q40": _jpeg(x, 40),
            "gamma 0.7": x ** 0.7,
            "gamma 1.4": x ** 1.4,
            "aspect 512x380": _resize(x, 512, 380),
            "noise": np.clip(x + np.random.default_rng(0).normal(0, 0.02, x.shape), 0, 1),
        }
        for name, y in copies.items():
            assert hamming_hex(h, phash(y)) <= 16, name
    # distinct chest X-rays (all look alike at low frequencies) stay far apart
    hs = [phash(x) for x in nih]
    d = [hamming_hex(hs[a], hs[b]) for a in range(len(hs)) for b in range(a + 1, len(hs))]
    assert min(d) > 32


def test_equalisation_is_what_makes_gamma_harmless(nih):
    x = nih[1]
    plain = hamming_hex(phash(x, equalize=False), phash(x ** 0.5, equalize=False))
    eq = hamming_hex(phash(x), phash(x ** 0.5))
    assert eq < plain


def test_words_roundtrip():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, size=(5, 256)).astype(np.uint8)
    hexes = [np.packbits(b).tobytes().hex() for b in bits]
    w = hex_to_words(hexes)
    assert w.shape == (5, 4) and w.dtype == np.uint64
    assert np.array_equal(words_to_bits(w), bits)
    d = hamming_words(w[:, None, :], w[None, :, :])
    assert d[1, 3] == (bits[1] != bits[3]).sum() == hamming_hex(hexes[1], hexes[3])


def test_area_resize_is_block_mean():
    x = np.arange(64, dtype=np.float32).reshape(8, 8)
    assert np.allclose(area_resize(x, 4, 4), x.reshape(4, 2, 4, 2).mean(axis=(1, 3)))
