"""Content hashes of decoded pixels: an exact digest and a perceptual DCT hash (our own, numpy + scipy).

Why these choices (measured on ../shared/data, see tests/curate/test_hashing.py):
- The textbook 64-bit pHash/dHash cannot tell chest X-rays apart: all CXRs share the same low-frequency
  layout, so distinct NIH images sit at 64-bit pHash distance 2-4 and some at dHash distance 0.
  A 256-coefficient pHash separates them (distinct images >= ~34 bits apart, copies <= ~4).
- The thumbnail is area-averaged, so a 64x64 copy and its 1024x1024 original hash alike (box averaging is
  what every antialiased downscaler approximates), and it is squashed to a square, so aspect changes
  (Kermany's uploader squashed every image) do not matter.
- The thumbnail is rank-equalised before the DCT, so monotone intensity changes between releases of the
  same image (gamma, VOI LUT, 8 vs 16 bit) barely move the hash; the median threshold handles contrast.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy.fft import dctn

PHASH_BITS = 256
_THUMB = 32


def exact_hash(pixels: np.ndarray) -> str:
    """Digest of the decoded image: shape + pixels quantised to 16 bits.

    Quantising removes float noise between decoders, so the same image stored losslessly as PNG, TIFF
    or uncompressed DICOM gets the same digest; any real pixel change gives a different one.
    """
    x = np.asarray(pixels, dtype=np.float32)
    q = (np.clip(x, 0.0, 1.0) * np.float32(65535.0) + np.float32(0.5)).astype("<u2")  # round half up
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(q.shape, dtype="<u4").tobytes())
    h.update(np.ascontiguousarray(q).tobytes())
    return h.hexdigest()


def area_resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area (box) resize of a float image; exact block means when the sizes divide."""
    im = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    return np.asarray(im.resize((width, height), Image.Resampling.BOX), dtype=np.float64)


@lru_cache(maxsize=8)
def _dct_order(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The `bits` lowest-frequency AC coefficients of a 32x32 DCT, by (u+v, u); DC (mean brightness) skipped."""
    coords = [(u, v) for u in range(_THUMB) for v in range(_THUMB) if (u, v) != (0, 0)]
    coords.sort(key=lambda c: (c[0] + c[1], c[0]))
    sel = coords[:bits]
    return np.array([c[0] for c in sel]), np.array([c[1] for c in sel])


def phash_thumbnail(pixels: np.ndarray, equalize: bool = True) -> np.ndarray:
    """The 32x32 (optionally rank-equalised) thumbnail the perceptual hash is computed from."""
    t = area_resize(pixels, _THUMB, _THUMB)
    if equalize:
        t = _average_ranks(t.ravel()).reshape(t.shape) / t.size
    return t


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (scipy's rankdata 'average', without importing stats)."""
    _, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(cnt) - (cnt - 1) / 2.0)[inv]


def phash(pixels: np.ndarray, bits: int = PHASH_BITS, equalize: bool = True) -> str:
    """Perceptual DCT hash as a hex string of `bits` bits (a multiple of 64; first coefficient = top bit)."""
    if bits % 64 or not 64 <= bits <= 1000:
        raise ValueError(f"phash bits must be a multiple of 64 in [64, 960], got {bits}")
    d = dctn(phash_thumbnail(pixels, equalize), type=2, norm="ortho")
    u, v = _dct_order(bits)
    coeffs = d[u, v]
    b = coeffs > np.median(coeffs)
    return np.packbits(b).tobytes().hex()


def hex_to_words(hexes: list[str] | np.ndarray) -> np.ndarray:
    """Hex hashes of equal length -> uint64 [N, bits/64] (big-endian words, so bit order is preserved)."""
    hexes = list(hexes)
    if not hexes:
        return np.zeros((0, PHASH_BITS // 64), dtype=np.uint64)
    n_bytes = len(hexes[0]) // 2
    if n_bytes % 8 or any(len(h) != 2 * n_bytes for h in hexes):
        raise ValueError("hashes must all have the same length, a multiple of 64 bits")
    raw = np.frombuffer(bytes.fromhex("".join(hexes)), dtype=">u8").reshape(len(hexes), n_bytes // 8)
    return raw.astype(np.uint64)


def words_to_bits(words: np.ndarray) -> np.ndarray:
    """uint64 [N, W] -> uint8 {0,1} [N, 64*W], bit 0 = most significant bit of word 0."""
    return np.unpackbits(words.astype(">u8").view(np.uint8), axis=1)


def hamming_hex(a: str, b: str) -> int:
    return int((int(a, 16) ^ int(b, 16)).bit_count())


def hamming_words(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance between two uint64 [N, W] arrays."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int64)
