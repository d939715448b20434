"""Benchmark: patient-level bootstrap CIs, ours (sort once, weighted cumulative sums) against the obvious
implementation (materialise each resample, call scikit-learn per finding), in the same process.

    python bench/evaluate.py                 # CXR-LT-like: 40 findings, 8,000 test images, 3,000 patients
    python bench/evaluate.py --images 40000  # closer to the official CXR-LT development set

Both compute per-finding AUROC and AP on the same patient resamples; the reference runs a few resamples and
is extrapolated to --boot. Also checks that the two agree on those resamples.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from chexfound.stats.bootstrap import FindingResampler, bootstrap_multilabel
from chexfound.stats.resample import BootstrapConfig, resample_indices, resample_weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--patients", type=int, default=3000)
    ap.add_argument("--findings", type=int, default=40)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--ref-boot", type=int, default=5, help="resamples timed for the scikit-learn reference")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    prev = np.geomspace(0.3, 0.002, a.findings)  # long-tailed, like CXR-LT
    y = (rng.random((a.images, a.findings)) < prev).astype(float)
    y[:, 0][:10] = 1
    p = np.clip(y * 0.3 + rng.random(y.shape), 0, None)
    pats = rng.integers(0, a.patients, a.images)
    names = [f"f{i}" for i in range(a.findings)]

    t = time.perf_counter()
    bootstrap_multilabel(y, p, names, pats, cfg=BootstrapConfig(n_boot=a.boot))
    ours = time.perf_counter() - t

    cfg = BootstrapConfig(n_boot=a.ref_boot)
    t = time.perf_counter()
    ref = []
    for idx in resample_indices(pats, a.images, cfg):
        row = []
        for c in range(a.findings):
            yy, pp = y[idx, c], p[idx, c]
            ok = 0 < yy.sum() < yy.size
            row.append((roc_auc_score(yy, pp), average_precision_score(yy, pp)) if ok else (np.nan, np.nan))
        ref.append(row)
    ref_s = (time.perf_counter() - t) / a.ref_boot * a.boot

    # agreement on the same resamples
    w = next(resample_weights(pats, a.images, cfg))[: a.ref_boot]
    worst = 0.0
    for c in range(a.findings):
        v = FindingResampler(y[:, c], p[:, c]).evaluate(w)
        for r in range(a.ref_boot):
            for k, j in (("auroc", 0), ("ap", 1)):
                if not np.isnan(ref[r][c][j]):
                    worst = max(worst, abs(float(v[k][r]) - ref[r][c][j]))
    print(f"{a.boot} patient resamples x {a.findings} findings, {a.images} images / {a.patients} patients")
    print(f"  ours:                       {ours:8.2f} s")
    print(f"  resample + scikit-learn:    {ref_s:8.2f} s (extrapolated from {a.ref_boot})")
    print(f"  speed-up:                   {ref_s / ours:8.1f} x   (max |difference| on shared resamples: {worst:.2e})")


if __name__ == "__main__":
    main()
