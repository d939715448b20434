"""Harrell's concordance index (C-index) for right-censored survival data: the one implementation."""

from __future__ import annotations

from typing import TypedDict

import numpy as np


class Concordance(TypedDict):
    """Harrell's C-index of a risk score against (time, event) and how many pairs and rows it rests on."""
    c_index: float           # NaN when no pair is comparable
    comparable_pairs: float
    n: int                   # rows used (NaN rows dropped)
    n_events: int


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray, block: int = 2048) -> Concordance:
    """Harrell's C for right-censored data; a higher `risk` should mean an earlier event.

    A pair (i, j) is comparable when t_i < t_j and i had the event; it is concordant when risk_i > risk_j and
    counts 1/2 when the risks tie. Pairs with equal times are not comparable. Computed in blocks (O(n^2)
    memory-bounded), NaN rows dropped.
    """
    t = np.asarray(time, dtype=np.float64).ravel()
    e = np.asarray(event, dtype=np.float64).ravel()
    r = np.asarray(risk, dtype=np.float64).ravel()
    m = ~(np.isnan(t) | np.isnan(e) | np.isnan(r))
    t, ev, r = t[m], e[m] > 0, r[m]
    conc = 0.0
    comparable = 0.0
    idx = np.flatnonzero(ev)
    for start in range(0, idx.size, block):
        i = idx[start : start + block]
        comp = t[i, None] < t[None, :]
        gt = r[i, None] > r[None, :]
        eq = r[i, None] == r[None, :]
        conc += float(np.sum(comp & gt)) + 0.5 * float(np.sum(comp & eq))
        comparable += float(np.sum(comp))
    return {"c_index": conc / comparable if comparable else float("nan"), "comparable_pairs": comparable,
            "n": int(t.size), "n_events": int(ev.sum())}
