"""Exact and near-duplicate removal: which images to drop, which kept image each one duplicates, and how.

Keep rule: items carry a priority rank (lower = preferred; the pipeline ranks by the spec's `keep` rule,
by default lossless, then more pixels, then more grey levels, then source order, then path: curate/keep.py).
Exact duplicates (same decoded-pixel digest) keep the best-ranked member. Near duplicates are then resolved greedily in rank order over the
edges (perceptual-hash distance <= threshold, or embedding cosine >= threshold): an image is dropped if it
matches an image already kept, and is recorded against the closest such image. So every dropped image is
*directly* matched to the kept image it names (no chains A~B~C), and no two kept images match each other.
An exact copy whose group's best member is itself dropped as a near duplicate names the image that member
was dropped for (their pixels are identical, so it matches it just as closely): every removed image names
an image that is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from chexfound.curate.hashing import hex_to_words
from chexfound.curate.index import near_pairs


@dataclass
class Edges:
    """Undirected matches between items (indices into the item table), with a method and a score."""

    i: np.ndarray
    j: np.ndarray
    method: str  # "phash" (score = Hamming distance, lower is closer) or "embedding" (cosine, higher)
    score: np.ndarray

    def closeness(self) -> np.ndarray:
        return -self.score if self.method == "phash" else self.score


@dataclass
class DedupResult:
    keep: np.ndarray  # bool [N]
    dup_of: np.ndarray  # int64 [N], -1 for kept items
    method: np.ndarray  # object [N]: "", "exact", "phash", "embedding"
    score: np.ndarray  # float64 [N]: Hamming distance / cosine to dup_of (NaN for kept, 0 for exact)


def exact_groups(digests: list[str] | np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each item, the index of the best-ranked item with the same digest (itself if it is the best)."""
    df = pd.DataFrame({"d": np.asarray(digests, dtype=object), "rank": rank, "idx": np.arange(len(rank))})
    best = df.sort_values(["rank", "idx"]).groupby("d", sort=False)["idx"].first()
    return df["d"].map(best).to_numpy(dtype=np.int64)


def phash_edges(hashes: list[str], candidates: np.ndarray, threshold: int, stats: dict | None = None) -> Edges:
    """Near-duplicate edges by perceptual-hash Hamming distance; `hashes[k]` belongs to item `candidates[k]`."""
    words = hex_to_words(list(hashes))
    i, j, d = near_pairs(words, threshold, stats=stats)
    return Edges(candidates[i], candidates[j], "phash", d.astype(np.float64))


def embedding_edges(emb: np.ndarray, candidates: np.ndarray, threshold: float, block: int = 2048) -> Edges:
    """Pairs with cosine similarity >= threshold, by blocked matrix products (exact, O(N^2 D) on BLAS);
    `emb[k]` belongs to item `candidates[k]`."""
    e = np.asarray(emb, dtype=np.float32)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    out_i, out_j, out_s = [], [], []
    for s in range(0, len(e), block):
        sims = e[s:s + block] @ e[s:].T
        ii, jj = np.nonzero(sims >= threshold)
        jj = jj + s
        keep = (ii + s) < jj
        out_i.append(ii[keep] + s)
        out_j.append(jj[keep])
        out_s.append(sims[ii[keep], jj[keep] - s])
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    i, j = cat(out_i, np.int64), cat(out_j, np.int64)
    return Edges(candidates[i], candidates[j], "embedding", cat(out_s, np.float64))


def resolve(n: int, rank: np.ndarray, exact_best: np.ndarray | None, edges: list[Edges]) -> DedupResult:
    """Decide what to keep. `exact_best` from `exact_groups` (None to skip exact dedup)."""
    keep = np.ones(n, dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)
    method = np.full(n, "", dtype=object)
    score = np.full(n, np.nan)
    if exact_best is not None:
        ex = exact_best != np.arange(n)
        keep[ex], dup_of[ex], method[ex], score[ex] = False, exact_best[ex], "exact", 0.0
    # adjacency over edges between exact survivors, best edge first per (node, neighbour)
    rows = []
    for pref, e in enumerate(edges):
        if len(e.i) == 0:
            continue
        ok = keep[e.i] & keep[e.j]
        a, b, s, c = e.i[ok], e.j[ok], e.score[ok], e.closeness()[ok]
        for u, v in ((a, b), (b, a)):
            rows.append(pd.DataFrame({"u": u, "v": v, "pref": pref, "close": c, "score": s, "m": e.method}))
    if not rows:
        return DedupResult(keep, dup_of, method, score)
    adj = pd.concat(rows, ignore_index=True)
    # for each node: candidates ordered by method preference (earlier edge lists first), then closeness
    adj = adj.sort_values(["u", "pref", "close"], ascending=[True, True, False], kind="stable")
    groups = {u: g for u, g in adj.groupby("u", sort=False)}
    for u in sorted(groups, key=lambda k: (rank[k], k)):
        g = groups[u]
        kept_nb = g[keep[g["v"].to_numpy()] & (dup_of[g["v"].to_numpy()] == -1)]
        # a neighbour counts only if it has already been decided as kept (ranked before u)
        kept_nb = kept_nb[[(rank[v], v) < (rank[u], u) for v in kept_nb["v"].to_numpy()]]
        if len(kept_nb):
            best = kept_nb.iloc[0]
            keep[u], dup_of[u], method[u], score[u] = False, int(best["v"]), best["m"], float(best["score"])
    for i in np.nonzero(method == "exact")[0]:  # the group's best was dropped after all: follow it, one step
        b = dup_of[i]
        if not keep[b]:
            dup_of[i], method[i], score[i] = dup_of[b], method[b], score[b]
    return DedupResult(keep, dup_of, method, score)
