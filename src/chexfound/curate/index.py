"""All pairs of hashes within a Hamming radius, without comparing all pairs: multi-index hashing.

Pigeonhole: split the B hash bits into m disjoint blocks. If two hashes differ in at most t bits, some block
differs in at most r = t // m bits. So for every block we bucket the items by that block's value and look
only at items whose block value lies within r bit flips of our own (sum_{k<=r} C(b, k) probes per block),
then verify the full distance. The result is exact (every pair within t is found) and, on hashes that are
not all alike, the candidates grow like N^2 / 2^b per probe instead of N^2 (b = block bits), so the work
is about N * probes + found pairs. `plan_index` picks m to minimise that cost for the given N.

Blocks take interleaved bits (block j = bits j, j+m, j+2m, ...): the hash bits are ordered by DCT
frequency and the low frequencies are strongly correlated across chest X-rays, so contiguous blocks of
low-frequency bits would make a few huge buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from chexfound.curate.hashing import hamming_words, words_to_bits

_DIRECT_MAX_BITS = 24  # block values up to 2^24 are bucketed by counting sort into a dense offsets table
_MAX_PAIRS_PER_STEP = 1 << 22


@dataclass(frozen=True)
class IndexPlan:
    n_blocks: int
    radius: int  # bit flips probed within each block
    block_bits: tuple[int, ...]
    probes: int  # lookups per item over all blocks
    est_candidates: float  # expected for uniformly random hashes

    def describe(self) -> str:
        return (f"{self.n_blocks} blocks of {min(self.block_bits)}-{max(self.block_bits)} bits, radius "
                f"{self.radius}, {self.probes} probes/item")


def _n_probes(b: int, r: int) -> int:
    return sum(math.comb(b, k) for k in range(r + 1))


def plan_index(n: int, bits: int, threshold: int) -> IndexPlan:
    """Choose the block count minimising probes + expected candidates (uniform-hash model)."""
    if threshold < 0:
        raise ValueError("threshold must be >= 0")
    best: tuple[float, IndexPlan] | None = None
    n = max(n, 2)
    for m in range(1, min(bits, max(threshold + 1, math.ceil(bits / 62))) + 1):
        r = threshold // m
        sizes = tuple(len(range(j, bits, m)) for j in range(m))
        if max(sizes) > 62:  # block values are int64 keys
            continue
        probes = sum(_n_probes(b, r) for b in sizes)
        if probes > 50_000:
            continue
        cand = sum(_n_probes(b, r) * n * n / 2.0 ** b for b in sizes)
        lookup = sum(_n_probes(b, r) * n * (1.0 if b <= _DIRECT_MAX_BITS else math.log2(n)) for b in sizes)
        tables = sum(2.0 ** b for b in sizes if b <= _DIRECT_MAX_BITS)  # dense offset tables to fill
        cost = lookup + 4.0 * cand + m * n * math.log2(n) + tables
        if best is None or cost < best[0]:
            best = (cost, IndexPlan(m, r, sizes, probes, cand))
    if best is None:
        raise ValueError(f"no feasible multi-index plan for threshold {threshold} on {bits}-bit hashes")
    return best[1]


def _block_keys(words: np.ndarray, n_blocks: int, chunk: int = 1 << 16) -> list[np.ndarray]:
    """Integer value of each interleaved block for every item: list over blocks of int64 [N]."""
    n, w = words.shape
    bits = 64 * w
    positions = [np.arange(j, bits, n_blocks) for j in range(n_blocks)]
    keys = [np.empty(n, dtype=np.int64) for _ in range(n_blocks)]
    for s in range(0, n, chunk):
        b = words_to_bits(words[s:s + chunk]).astype(np.int64)
        for j, pos in enumerate(positions):
            keys[j][s:s + chunk] = b[:, pos] @ (np.int64(1) << np.arange(len(pos), dtype=np.int64))
    return keys


def _flip_masks(b: int, r: int) -> np.ndarray:
    out = [0]
    for k in range(1, r + 1):
        for combo in combinations(range(b), k):
            out.append(sum(1 << c for c in combo))
    return np.array(out, dtype=np.int64)


def near_pairs(
    words: np.ndarray, threshold: int, plan: IndexPlan | None = None, stats: dict | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) with Hamming(words[i], words[j]) <= threshold, and its distance.

    words: uint64 [N, W]. Returns int64 arrays (i, j, distance) sorted by (i, j).
    `stats`, if given, receives the plan and the number of candidates verified.
    """
    words = np.ascontiguousarray(words, dtype=np.uint64)
    n = len(words)
    empty = np.zeros(0, dtype=np.int64)
    if n < 2:
        return empty, empty, empty
    plan = plan or plan_index(n, 64 * words.shape[1], threshold)
    keys = _block_keys(words, plan.n_blocks)
    found_i, found_j, found_d = [], [], []
    n_cand = 0
    ids = np.arange(n, dtype=np.int64)
    for key, b in zip(keys, plan.block_bits):
        order = np.argsort(key, kind="stable")
        skey = key[order]
        direct = b <= _DIRECT_MAX_BITS
        if direct:
            starts = np.zeros((1 << b) + 1, dtype=np.int64)
            np.cumsum(np.bincount(key, minlength=1 << b), out=starts[1:])
        for mask in _flip_masks(b, plan.radius):
            q = key ^ mask
            if direct:
                lo, hi = starts[q], starts[q + 1]
            else:
                lo, hi = np.searchsorted(skey, q, "left"), np.searchsorted(skey, q, "right")
            cnt = hi - lo
            # expand in steps so the candidate arrays stay bounded in memory
            csum = np.cumsum(cnt)
            total = int(csum[-1])
            n_cand += total
            if total == 0:
                continue
            cuts = np.searchsorted(csum, np.arange(_MAX_PAIRS_PER_STEP, total, _MAX_PAIRS_PER_STEP), "left")
            for s, e in zip(np.r_[0, cuts], np.r_[cuts, n]):
                c = cnt[s:e]
                m = int(c.sum())
                if m == 0:
                    continue
                qi = np.repeat(ids[s:e], c)
                offs = np.arange(m, dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
                cj = order[np.repeat(lo[s:e], c) + offs]
                keep = qi < cj  # each unordered pair once (it is seen from both sides)
                qi, cj = qi[keep], cj[keep]
                d = hamming_words(words[qi], words[cj])
                ok = d <= threshold
                found_i.append(qi[ok])
                found_j.append(cj[ok])
                found_d.append(d[ok])
    if stats is not None:
        stats.update(plan=plan, candidates=n_cand)
    if not found_i:
        return empty, empty, empty
    i, j, d = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)
    # a pair close in several blocks is found several times
    code, first = np.unique(i * n + j, return_index=True)
    return code // n, code % n, d[first]


def brute_pairs(words: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The quadratic reference: all pairs (i < j) within `threshold` (for tests and the benchmark)."""
    words = np.ascontiguousarray(words, dtype=np.uint64)
    n = len(words)
    chunk = max(1, (1 << 21) // max(1, n * words.shape[1]))
    out_i, out_j, out_d = [], [], []
    for s in range(0, n, chunk):
        a = words[s:s + chunk]
        d = np.bitwise_count(a[:, None, :] ^ words[None, :, :]).sum(-1)
        ii, jj = np.nonzero(d <= threshold)
        ii = ii + s
        keep = ii < jj
        out_i.append(ii[keep])
        out_j.append(jj[keep])
        out_d.append(d[ii[keep] - s, jj[keep]])
    if not out_i:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z
    i, j, d = (np.concatenate(x).astype(np.int64) for x in (out_i, out_j, out_d))
    o = np.lexsort((j, i))
    return i[o], j[o], d[o]
