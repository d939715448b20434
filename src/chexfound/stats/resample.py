"""Patient-level (cluster) bootstrap resampling: the one resampler every confidence interval uses.

Images of one patient are correlated, so resampling images treats them as independent evidence and gives
intervals that are too narrow. We resample *patients* with replacement (as many draws as there are
patients); each image then carries the weight "how many times its patient was drawn", which is exactly the
same as duplicating that patient's images. Ranking metrics take those weights directly (ranking.py), so a
resample never copies data; statistics without a weighted form take materialised indices
(`resample_indices`, `bootstrap_statistic`). `groups=None` means every image is its own cluster (an
image-level bootstrap: right only when each patient has one image).

Intervals are percentile intervals over `n_boot` resamples (`percentile_ci`); for a statistic whose resamples
lean to one side of its estimate, Efron's bias-corrected percentile interval (`bias_corrected_ci`) or the
percentile interval widened to reach the estimate (`widened_percentile_ci`). chexfound.stats.calibration says
which of its CIs uses which, and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class BootstrapConfig:
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0
    chunk: int = 100  # resamples evaluated together (memory ~ chunk x n_images doubles)
    level: str = "patient"  # "patient" (clusters) or "image" (ignores clustering; for comparison only)


def cluster_index(groups: Sequence[Any] | np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """Map group ids (e.g. patient ids) to 0..G-1; None means every image is its own group."""
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups)
    if g.shape[0] != n:
        raise ValueError(f"{g.shape[0]} group ids for {n} images")
    _, inv = np.unique(g.astype(str), return_inverse=True)
    return inv.ravel(), int(inv.max()) + 1 if n else 0


def resample_weights(
    groups: Sequence[Any] | np.ndarray | None, n: int, cfg: BootstrapConfig
) -> Iterator[np.ndarray]:
    """Yield weight matrices [b, n] (b <= cfg.chunk) summing to n_boot rows: w[r, i] = draws of i's cluster."""
    if cfg.level not in ("patient", "image"):
        raise ValueError(f"bootstrap level must be 'patient' or 'image', got {cfg.level!r}")
    idx, n_groups = cluster_index(groups if cfg.level == "patient" else None, n)
    rng = np.random.default_rng(cfg.seed)
    done = 0
    while done < cfg.n_boot:
        b = min(cfg.chunk, cfg.n_boot - done)
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=b).astype(np.float64)
        yield counts[:, idx]
        done += b


def percentile_ci(samples: np.ndarray, ci: float) -> tuple[float, float]:
    """The central `ci` percentile interval of bootstrap samples (NaN samples ignored; (NaN, NaN) if none)."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[~np.isnan(s)]
    if s.size == 0:
        return float("nan"), float("nan")
    a = (1 - ci) / 2
    lo, hi = np.quantile(s, [a, 1 - a])
    return float(lo), float(hi)


PERCENTILE = "percentile"
BIAS_CORRECTED = "bias-corrected percentile (BC)"
WIDENED = "percentile widened to the estimate"
_NORMAL = NormalDist()


def widened_percentile_ci(samples: np.ndarray, estimate: float, ci: float) -> tuple[float, float]:
    """The percentile interval, its near end moved to the estimate where the estimate lies outside it (so it
    always contains the estimate; `bias_corrected_ci` falls back to it). A NaN estimate gives the percentile
    interval."""
    lo, hi = percentile_ci(samples, ci)
    est = float(estimate)
    if not np.isfinite(est) or np.isnan(lo):
        return lo, hi
    return min(lo, est), max(hi, est)


def bias_corrected_ci(samples: np.ndarray, estimate: float, ci: float) -> tuple[float, float]:
    """Efron's bias-corrected (BC) percentile interval of bootstrap `samples` around `estimate`.

    z0 = Phi^-1(share of samples below the estimate, ties counted half); the interval runs between the sample
    quantiles at Phi(2 z0 -/+ z), z = Phi^-1(1 - (1 - ci) / 2). z0 = 0 (the estimate is the bootstrap median)
    gives the percentile interval. There is no acceleration term: it would need a patient jackknife.

    The BC interval contains the estimate exactly when |z0| <= z, i.e. when the estimate lies inside the
    central `ci` band of the samples, the same condition under which the percentile interval contains it.
    Beyond that (the samples sit almost wholly on one side, as ECE's do on small test sets: resampling
    duplicates patients and re-draws bins, which only adds apparent miscalibration) the bias correction would
    move both ends past the estimate to quantiles near the edge of the samples (and, with every sample on one
    side, to a zero-width interval at the nearest sample), so the interval is the percentile interval widened
    to reach the estimate: [estimate, q_hi] when the samples lie above it, [q_lo, estimate] when below. That
    keeps the far end the bootstrap supports and claims no precision the resamples cannot show; its near end
    says only that the estimate itself is a plausible value. The switch is not continuous: at z0 = -z the BC
    interval is [q(Phi(-3 z)), estimate], just beyond it [estimate, q_hi]. Where that matters (ECE), measure
    (bench/calibration_ci.py); chexfound.stats.calibration uses the widened percentile interval for ECE.

    NaN samples are ignored; no finite sample gives (NaN, NaN); a NaN estimate gives the percentile interval.
    """
    s = np.asarray(samples, dtype=np.float64)
    s = s[~np.isnan(s)]
    est = float(estimate)
    if s.size == 0 or not np.isfinite(est):
        return percentile_ci(s, ci)
    a = (1 - ci) / 2
    share = (np.sum(s < est) + 0.5 * np.sum(s == est)) / s.size
    if a <= share <= 1 - a:
        z, z0 = _NORMAL.inv_cdf(1 - a), _NORMAL.inv_cdf(min(max(share, 1e-12), 1 - 1e-12))
        lo, hi = np.quantile(s, [_NORMAL.cdf(2 * z0 - z), _NORMAL.cdf(2 * z0 + z)])
        # At |z0| = z the near end is the estimate up to quantile interpolation: keep it inside.
        return float(min(lo, est)), float(max(hi, est))
    return widened_percentile_ci(s, est, ci)


def resample_indices(groups: Sequence[Any] | np.ndarray | None, n: int,
                     cfg: BootstrapConfig) -> Iterator[np.ndarray]:
    """Yield one index array per resample: every image of each drawn patient, repeated as often as it was
    drawn (for statistics that have no weighted form, e.g. the C-index)."""
    for w in resample_weights(groups, n, cfg):
        counts = w.astype(np.int64)
        for row in counts:
            yield np.repeat(np.arange(n), row)


def bootstrap_statistic(
    fn: Callable[[np.ndarray], float], n: int, groups: Sequence[Any] | np.ndarray | None,
    cfg: BootstrapConfig = BootstrapConfig(),
) -> dict[str, Any]:
    """Percentile CI of `fn(indices) -> float` over patient-level resamples (materialised indices)."""
    vals = np.array([fn(idx) for idx in resample_indices(groups, n, cfg)], dtype=np.float64)
    lo, hi = percentile_ci(vals, cfg.ci)
    return {"ci": [lo, hi], "n_degenerate": int(np.sum(np.isnan(vals))), "se": float(np.nanstd(vals))}
