"""Multi-label bootstrap confidence intervals and paired model comparisons, on patient resamples.

Every model and every finding is evaluated on the same resamples (resample.py), so the difference of two
models is a paired difference. Intervals are percentile intervals over `n_boot` resamples. A resample in
which a finding has no positive or no negative weight gives NaN for that finding and is skipped for it (the
count is reported as `n_degenerate`); macro/group means in a resample average the eligible findings that are
defined in it.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from chexfound.stats.multilabel import EligibilityRule
from chexfound.stats.ranking import RankedScores
from chexfound.stats.resample import BootstrapConfig, cluster_index, percentile_ci, resample_weights


class FindingResampler:
    """One finding's labelled rows, pre-ranked for weighted metrics."""

    def __init__(self, y: np.ndarray, p: np.ndarray, thr: float = 0.5) -> None:
        rows = np.flatnonzero(~np.isnan(y))
        self.ranked = RankedScores(y[rows], p[rows])
        # Rows in score order: one gather per resample chunk serves the ranking and the confusion counts.
        self.rows = rows[self.ranked.order]
        yy = y[self.rows] == 1
        pred = p[self.rows] >= thr
        # Confusion cells as 0/1 vectors, so weighted counts are matrix-vector products.
        self.cells = np.stack([yy & pred, yy & ~pred, ~yy & ~pred, ~yy & pred], axis=1).astype(np.float64)
        if not np.isfinite(thr):  # no threshold (no call): call metrics are undefined
            self.cells[:] = np.nan

    def evaluate(self, w: np.ndarray) -> dict[str, np.ndarray]:
        ws = w[:, self.rows]
        auc, ap = self.ranked.auroc_ap_sorted(ws)
        tp, fn, tn, fp = (ws @ self.cells).T
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
            spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
            f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        return {"auroc": auc, "ap": ap, "sensitivity": sens, "specificity": spec, "f1": f1}


_KEYS = ("auroc", "ap", "sensitivity", "specificity", "f1")


def _eligible(y: np.ndarray, rule: EligibilityRule) -> list[int]:
    out = []
    for c in range(y.shape[1]):
        col = y[:, c]
        if rule.ok(int(np.sum(col == 1)), int(np.sum(col == 0))):
            out.append(c)
    return out


def _draws(
    y: np.ndarray, preds: Sequence[np.ndarray], thresholds: Sequence[np.ndarray], groups: Any,
    findings: Sequence[str], cfg: BootstrapConfig, rule: EligibilityRule,
    subsets: Mapping[str, Sequence[str]],
) -> tuple[list[dict[str, dict[str, np.ndarray]]], list[dict[str, dict[str, np.ndarray]]], list[int]]:
    """Per model: per-finding and per-subset (macro, groups) bootstrap draws, all on the same resamples."""
    y = np.asarray(y, dtype=np.float64)
    eligible = _eligible(y, rule)
    name_to_c = {f: i for i, f in enumerate(findings)}
    sub_idx = {k: [name_to_c[f] for f in v if f in name_to_c and name_to_c[f] in eligible] for k, v in subsets.items()}
    models = [[FindingResampler(y[:, c], np.asarray(p, dtype=np.float64)[:, c], float(thresholds[m][c]))
               for c in eligible]
              for m, p in enumerate(preds)]
    per: list[dict[str, dict[str, list[np.ndarray]]]] = [
        {findings[c]: {k: [] for k in _KEYS} for c in eligible} for _ in preds]
    # Micro: all labelled (image, finding) pairs of eligible findings pooled; a pair carries its image's weight.
    ye = y[:, eligible]
    lab = ~np.isnan(ye)
    pair_img = np.nonzero(lab)[0]
    micro = [RankedScores(ye[lab], np.asarray(p, dtype=np.float64)[:, eligible][lab]) if eligible else None
             for p in preds]
    micro_draws: list[dict[str, list[np.ndarray]]] = [{"auroc": [], "ap": []} for _ in preds]
    for w in resample_weights(groups, y.shape[0], cfg):
        for m, fs in enumerate(models):
            for f, c in zip(fs, eligible):
                vals = f.evaluate(w)
                for k in _KEYS:
                    per[m][findings[c]][k].append(vals[k])
            if micro[m] is not None:
                # The pooled vector is n_images x n_findings long: a few resamples at a time keep the
                # temporaries in cache (a whole chunk would be hundreds of MB and memory-bound).
                step = max(1, int(2_000_000 // max(1, pair_img.size)))
                for r0 in range(0, w.shape[0], step):
                    a, b = micro[m].auroc_ap(w[r0 : r0 + step][:, pair_img])
                    micro_draws[m]["auroc"].append(a)
                    micro_draws[m]["ap"].append(b)
    per_arr = [{f: {k: np.concatenate(v[k]) for k in _KEYS} for f, v in pm.items()} for pm in per]
    subs: list[dict[str, dict[str, np.ndarray]]] = []
    for pm in per_arr:
        sm: dict[str, dict[str, np.ndarray]] = {}
        for name, cs in sub_idx.items():
            sm[name] = {}
            for k in _KEYS:
                if cs:
                    mat = np.stack([pm[findings[c]][k] for c in cs], axis=1)
                    with warnings.catch_warnings():  # all-NaN resamples become NaN, as intended
                        warnings.simplefilter("ignore", RuntimeWarning)
                        sm[name][k] = np.nanmean(mat, axis=1)
                else:
                    sm[name][k] = np.full(cfg.n_boot, np.nan)
        subs.append(sm)
    for m, d in enumerate(micro_draws):
        subs[m]["micro"] = {k: np.concatenate(v) if v else np.full(cfg.n_boot, np.nan) for k, v in d.items()}
    return per_arr, subs, eligible


def bootstrap_multilabel(
    y: np.ndarray,
    p: np.ndarray,
    findings: Sequence[str],
    groups: Sequence[Any] | np.ndarray | None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    cfg: BootstrapConfig = BootstrapConfig(),
    rule: EligibilityRule = EligibilityRule(),
    subsets: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Percentile CIs for every eligible finding and for the macro mean (+ any named subsets of findings).

    Returns {"per_finding": {name: {"auroc_ci": [lo, hi], "ap_ci": ..., "sensitivity_ci": ..., ...,
    "n_degenerate": k}}, "macro": {"auroc_ci": ..., ...}, "subsets": {name: {...}}, "config": {...}}.
    """
    y = np.asarray(y, dtype=np.float64)
    thr = np.full(len(findings), 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    subsets = dict(subsets or {})
    subsets["macro"] = list(findings)
    per_arr, subs, eligible = _draws(y, [p], [thr], groups, findings, cfg, rule, subsets)
    per: dict[str, dict[str, Any]] = {}
    for f, d in per_arr[0].items():
        per[f] = {f"{k}_ci": list(percentile_ci(d[k], cfg.ci)) for k in _KEYS}
        per[f]["auroc_se"] = float(np.nanstd(d["auroc"])) if np.any(~np.isnan(d["auroc"])) else float("nan")
        per[f]["n_degenerate"] = int(np.sum(np.isnan(d["auroc"])))
    summ = {name: {f"{k}_ci": list(percentile_ci(v[k], cfg.ci)) for k in _KEYS if k in v}
            for name, v in subs[0].items()}
    _, n_clusters = cluster_index(groups if cfg.level == "patient" else None, y.shape[0])
    return {
        "per_finding": per,
        "macro": summ.pop("macro"),
        "micro": summ.pop("micro"),
        "subsets": summ,
        "config": {"n_boot": cfg.n_boot, "ci": cfg.ci, "seed": cfg.seed, "level": cfg.level,
                   "n_clusters": n_clusters, "method": "percentile"},
    }


def paired_bootstrap(
    y: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    findings: Sequence[str],
    groups: Sequence[Any] | np.ndarray | None,
    cfg: BootstrapConfig = BootstrapConfig(),
    rule: EligibilityRule = EligibilityRule(),
    subsets: Mapping[str, Sequence[str]] | None = None,
    metrics: Sequence[str] = ("auroc", "ap"),
) -> dict[str, Any]:
    """Difference A - B on the *same* patient resamples: point estimate, CI and a two-sided bootstrap p-value.

    p = min(1, 2 * min(P(d <= 0), P(d >= 0))) over the resampled differences (the usual percentile test).
    """
    y = np.asarray(y, dtype=np.float64)
    if np.shape(p_a) != y.shape or np.shape(p_b) != y.shape:
        raise ValueError(f"predictions {np.shape(p_a)} / {np.shape(p_b)} must match labels {y.shape}")
    thr = np.full(len(findings), 0.5)
    subsets = dict(subsets or {})
    subsets["macro"] = list(findings)
    per_arr, subs, eligible = _draws(y, [p_a, p_b], [thr, thr], groups, findings, cfg, rule, subsets)
    full_w = np.ones((1, y.shape[0]))

    def point(p: np.ndarray, c: int) -> dict[str, float]:
        v = FindingResampler(y[:, c], np.asarray(p, dtype=np.float64)[:, c]).evaluate(full_w)
        return {k: float(v[k][0]) for k in metrics}

    def summarise(da: np.ndarray, db: np.ndarray, pa: float, pb: float) -> dict[str, Any]:
        d = da - db
        d = d[~np.isnan(d)]
        if d.size == 0:
            return {"a": pa, "b": pb, "diff": pa - pb, "ci": [float("nan")] * 2, "p_value": float("nan")}
        pval = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
        return {"a": pa, "b": pb, "diff": pa - pb, "ci": list(percentile_ci(d, cfg.ci)), "p_value": pval}

    per: dict[str, dict[str, Any]] = {}
    points_a = {findings[c]: point(p_a, c) for c in eligible}
    points_b = {findings[c]: point(p_b, c) for c in eligible}
    for c in eligible:
        f = findings[c]
        per[f] = {k: summarise(per_arr[0][f][k], per_arr[1][f][k], points_a[f][k], points_b[f][k]) for k in metrics}
    name_to_c = {f: i for i, f in enumerate(findings)}
    summ: dict[str, dict[str, Any]] = {}
    for name, members in subsets.items():  # (micro differences are not reported: macro is the headline)
        elig = [f for f in members if f in name_to_c and name_to_c[f] in eligible]
        summ[name] = {}
        for k in metrics:
            pa = float(np.mean([points_a[f][k] for f in elig])) if elig else float("nan")
            pb = float(np.mean([points_b[f][k] for f in elig])) if elig else float("nan")
            summ[name][k] = summarise(subs[0][name][k], subs[1][name][k], pa, pb)
    return {"per_finding": per, "macro": summ.pop("macro"), "subsets": summ,
            "config": {"n_boot": cfg.n_boot, "ci": cfg.ci, "seed": cfg.seed, "level": cfg.level}}
