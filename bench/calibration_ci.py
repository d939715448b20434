"""Which bootstrap interval the calibration CIs use: percentile or bias-corrected (BC), measured.

For each metric (Brier, ECE, calibration intercept and slope) and each interval it prints, over repeated
synthetic test sets drawn from a known population:
  - contains: how often the interval contains its own point estimate (a report whose CI excludes its estimate
    reads as a bug);
  - covers: how often it contains the population value (for ECE: the 10-equal-mass-bin ECE of the population,
    0 for a calibrated model);
  - hi<truth: how often the upper end falls below the population value (claims better calibration than there is);
  - width: the mean width;
  - z0: the median bias correction Phi^-1(share of resamples below the estimate).
Scores p ~ Beta(1, 4) (a low-prevalence finding), labels y ~ Bernoulli(p) ("calibrated") or Bernoulli(p^1.6)
("too high": the probabilities overstate the risk). One image per patient.

With --demo DIR (a `chexfound demo` output folder) it also scores the demo's cached test predictions (NIH-14 and
Kermany test splits, through the same `calibration_summary` as `evaluate` and the demo) with both intervals and
counts the CIs that exclude their estimate.

    PYTHONPATH=src python bench/calibration_ci.py [--smoke] [--reps 200] [--demo demo-out]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Stopwatch  # noqa: E402

from chexfound.stats.calibration import KEYS, FindingCalibration, calibration_summary, interval  # noqa: E402
from chexfound.stats.resample import (BIAS_CORRECTED, PERCENTILE, WIDENED, BootstrapConfig,  # noqa: E402
                                      resample_weights)

METHODS = (PERCENTILE, BIAS_CORRECTED, WIDENED)

POWER = {"calibrated": 1.0, "too high": 1.6}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logistic(z: np.ndarray, q: np.ndarray, slope: bool) -> tuple[float, float]:
    """Fit logit P(y=1) = a + b z to expected labels q (b = 1 unless slope) by Newton's method."""
    a, b = 0.0, 1.0
    for _ in range(100):
        mu = _sigmoid(a + b * z)
        r, v = q - mu, mu * (1 - mu)
        if slope:
            h = np.array([[v.sum(), v @ z], [v @ z, v @ (z * z)]])
            da, db = np.linalg.solve(h, np.array([r.sum(), r @ z]))
        else:
            da, db = r.sum() / v.sum(), 0.0
        a, b = a + da, b + db
        if abs(da) + abs(db) < 1e-12:
            break
    return a, b


def population(power: float, m: int = 400_000, seed: int = 99) -> dict[str, float]:
    """The metrics' population values: the expectations over a large sample of scores, with E[y | p]."""
    p = np.sort(np.random.default_rng(seed).beta(1, 4, m))
    q = p ** power
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(p, 1e-6, 1 - 1e-6))
    bins = np.array_split(np.arange(m), 10)
    return {"brier": float(np.mean(p * p - 2 * p * q + q)),
            "ece": float(sum(len(i) / m * abs(q[i].mean() - p[i].mean()) for i in bins)),
            "cal_intercept": _logistic(z, q, False)[0], "cal_slope": _logistic(z, q, True)[1]}


def simulate(n: int, power: float, reps: int, n_boot: int, ci: float = 0.95) -> dict[str, dict[str, list[float]]]:
    truth = population(power)
    rec: dict[str, dict[str, list[float]]] = {f"{k}/{m}": {"contains": [], "covers": [], "low": [], "width": [],
                                                                 "z0": []}
                                              for k in KEYS for m in METHODS}
    from statistics import NormalDist

    for rep in range(reps):
        rng = np.random.default_rng(10_000 + rep)
        p = rng.beta(1, 4, n)
        y = (rng.uniform(size=n) < p ** power).astype(np.float64)
        fc = FindingCalibration(y, p)
        est = {k: float(v[0]) for k, v in fc.evaluate(np.ones((1, n))).items()}
        draws: dict[str, list[np.ndarray]] = {k: [] for k in KEYS}
        for w in resample_weights(None, n, BootstrapConfig(n_boot=n_boot, seed=rep)):
            for k, v in fc.evaluate(w).items():
                draws[k].append(v)
        for k in KEYS:
            s = np.concatenate(draws[k])
            s = s[~np.isnan(s)]
            if not np.isfinite(est[k]) or not s.size:
                continue
            share = (np.sum(s < est[k]) + 0.5 * np.sum(s == est[k])) / s.size
            z0 = NormalDist().inv_cdf(min(max(share, 1e-6), 1 - 1e-6))
            for m in METHODS:
                lo, hi = interval(m, s, est[k], ci)
                r = rec[f"{k}/{m}"]
                r["contains"].append(float(lo <= est[k] <= hi))
                r["covers"].append(float(lo <= truth[k] <= hi))
                r["low"].append(float(hi < truth[k]))
                r["width"].append(hi - lo)
                r["z0"].append(z0)
    return rec


def demo_rows(demo: Path, n_boot: int) -> tuple[list[tuple[str, str, str, int, int, int]], list[str]]:
    """(set, head, metric, CIs, excluding the estimate: percentile, BC) over the demo's cached test predictions,
    and the ECE intervals of each head's macro and first finding by every method, as lines."""
    import pandas as pd

    import json

    rows, lines = [], []
    nih = json.loads((demo / "report.json").read_text()).get("data", {}).get("nih14_findings")
    for task, files in (("nih14", ("glori-test-probs-uncalibrated", "glori-test-probs", "linear-test-probs")),
                        ("kermany", ("linear-test-probs",))):
        df = pd.read_csv(demo / "data" / f"{task}.csv")
        df = df[df["split"].astype(str) == "test"]
        findings = ["PNEUMONIA"] if task == "kermany" else list(nih or [])
        y = df[findings].to_numpy(dtype=np.float64)
        pats = df["patient_id"].astype(str).to_numpy()
        for which in ("pretrained", "random"):
            for f in files:
                path = demo / "cache" / which / f"{task}-{f}.npy"
                if not path.is_file():
                    continue
                p = np.load(path)
                p = p[:, None] if p.ndim == 1 else p
                if len(p) != len(y):
                    continue
                cfg = BootstrapConfig(n_boot=n_boot)
                out = {m: calibration_summary(y, p, findings, pats, cfg, ci_methods={k: m for k in KEYS})
                       for m in METHODS}
                for k in KEYS:
                    excl, total = {}, 0
                    for m, s in out.items():
                        ds = [s["per_finding"][f] for f in s["eligible"]] + [s["macro"]]
                        ds = [d for d in ds if np.isfinite(d[k]) and np.all(np.isfinite(d[f"{k}_ci"]))]
                        excl[m] = sum(not d[f"{k}_ci"][0] <= d[k] <= d[f"{k}_ci"][1] for d in ds)
                        total = len(ds)
                    rows.append((task, f"{which} {f}", k, total, excl[PERCENTILE], excl[BIAS_CORRECTED]))
                    if k == "ece":  # the shipped intervals beside each other: the macro and the first finding
                        for m, s in out.items():
                            first = s["eligible"][0]
                            for name, d in (("macro", s["macro"]), (first, s["per_finding"][first])):
                                lo, hi = d["ece_ci"]
                                lines.append(f"{task:<8} {which + ' ' + f:<44} {name:<12} {d['ece']:.3f} "
                                             f"[{lo:.3f}, {hi:.3f}]  {m}")
    return rows, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds: 3 repetitions, 200 resamples, n = 100")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--populations", nargs="+", choices=list(POWER), default=list(POWER))
    ap.add_argument("--demo", type=Path, help="a chexfound demo output folder (data/*.csv and cache/)")
    args = ap.parse_args(argv)
    reps, n_boot, sizes = (3, 200, [100]) if args.smoke else (args.reps, args.n_boot, args.sizes)
    print(f"{reps} test sets per row, {n_boot} resamples each, 95% intervals")
    print(f"{'population':<11} {'n':>5} {'metric':<14} {'interval':<36} {'contains':>8} {'covers':>7} "
          f"{'hi<truth':>8} {'width':>7} {'z0':>6}")
    for name, power in ((k, POWER[k]) for k in args.populations):
        for n in sizes:
            with Stopwatch() as sw:
                rec = simulate(n, power, reps, n_boot)
            for key, r in rec.items():
                k, m = key.split("/")
                if r["contains"]:
                    print(f"{name:<11} {n:>5} {k:<14} {m:<36} {np.mean(r['contains']):>8.3f} "
                          f"{np.mean(r['covers']):>7.3f} {np.mean(r['low']):>8.3f} {np.mean(r['width']):>7.4f} "
                          f"{np.median(r['z0']):>6.2f}")
            print(f"({name}, n = {n}: {reps} test sets x {n_boot} resamples in {sw.seconds:.1f} s)")
    if args.demo:
        print(f"\ndemo test predictions ({args.demo}): CIs that exclude their estimate (per finding + macro)")
        print(f"{'set':<8} {'head':<44} {'metric':<14} {'CIs':>4} {'percentile':>10} {'BC':>4}")
        rows, lines = demo_rows(args.demo, n_boot)
        for t, h, k, total, ep, eb in rows:
            print(f"{t:<8} {h:<44} {k:<14} {total:>4} {ep:>10} {eb:>4}")
        print("\nECE intervals (macro and first finding) by each method")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
