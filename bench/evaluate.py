"""Benchmark: patient-level bootstrap CIs, ours (sort once, weighted cumulative sums) against the obvious
implementation (materialise each resample, call scikit-learn per finding), in the same process.

    python bench/evaluate.py                 # CXR-LT-like: 40 findings, 8,000 test images, 3,000 patients
    python bench/evaluate.py --images 40000  # closer to the official CXR-LT development set
    python bench/evaluate.py --smoke         # seconds: 400 images, 5 findings, 20 resamples (checks the code)

Both compute per-finding AUROC and AP on the same patient resamples; the reference runs a few resamples and
is extrapolated to --boot. Also checks that the two agree on those resamples.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Stopwatch  # noqa: E402

from chexfound.stats.bootstrap import FindingResampler, bootstrap_multilabel  # noqa: E402
from chexfound.stats.resample import BootstrapConfig, resample_indices, resample_weights  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--patients", type=int, default=3000)
    ap.add_argument("--findings", type=int, default=40)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--ref-boot", type=int, default=5, help="resamples timed for the scikit-learn reference")
    ap.add_argument("--smoke", action="store_true", help="seconds: 400 images, 5 findings, 20 resamples")
    a = ap.parse_args()
    if a.smoke:
        a.images, a.patients, a.findings, a.boot, a.ref_boot = 400, 150, 5, 20, 2
    rng = np.random.default_rng(0)
    prev = np.geomspace(0.3, 0.002, a.findings)  # long-tailed, like CXR-LT
    y = (rng.random((a.images, a.findings)) < prev).astype(float)
    y[:, 0][:10] = 1
    p = np.clip(y * 0.3 + rng.random(y.shape), 0, None)
    pats = rng.integers(0, a.patients, a.images)
    names = [f"f{i}" for i in range(a.findings)]

    with Stopwatch() as sw:
        bootstrap_multilabel(y, p, names, pats, cfg=BootstrapConfig(n_boot=a.boot))
    ours = sw.seconds

    cfg = BootstrapConfig(n_boot=a.ref_boot)
    ref = []
    with Stopwatch() as sw:
        for idx in resample_indices(pats, a.images, cfg):
            row = []
            for c in range(a.findings):
                yy, pp = y[idx, c], p[idx, c]
                ok = 0 < yy.sum() < yy.size
                row.append((roc_auc_score(yy, pp), average_precision_score(yy, pp)) if ok else (np.nan, np.nan))
            ref.append(row)
    ref_s = sw.seconds / a.ref_boot * a.boot

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
