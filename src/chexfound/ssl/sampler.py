"""Sharded, seeded, resumable sampling: which corpus items rank r trains on at iteration t.

The global stream is the concatenation of per-epoch permutations (epoch e: numpy permutation seeded by
(seed, e)); iteration t consumes stream positions [t * B_global, (t + 1) * B_global), and rank r takes the
slice [r * B, (r + 1) * B) of them. Any (t, r) is computed directly, so resuming at iteration t needs no
replay and the result does not depend on loader workers or on where a run was interrupted.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class ShardedStreamSampler:
    def __init__(self, n_items: int, batch_per_rank: int, world_size: int = 1, rank: int = 0, seed: int = 0) -> None:
        if n_items < 1:
            raise ValueError("cannot sample from an empty corpus")
        self.n, self.b, self.world, self.rank, self.seed = n_items, batch_per_rank, world_size, rank, seed
        self._perm = lru_cache(maxsize=4)(self._permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def indices(self, step: int) -> np.ndarray:
        start = (step * self.world + self.rank) * self.b
        pos = np.arange(start, start + self.b, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.n)
        out = np.empty(self.b, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out

    def epoch_of(self, step: int) -> float:
        """Passes over the corpus completed (all ranks together) by the start of `step`."""
        return step * self.world * self.b / self.n
