"""The logistic probe: the one linear classifier every "features -> findings" comparison fits.

Model: per finding, L2-regularised logistic regression on standardised features (train mean / std),
scikit-learn's `LogisticRegression(C)` objective, all findings optimised jointly in one L-BFGS run
(`fit_logistic`). NaN labels are masked (a row counts only for the findings it is labelled for).

Regularisation search (stated once, used by the pretraining probes, `chexfound evaluate`'s linear probe and
the demo): one inverse strength C for all findings, picked from `C_GRID` by macro AUROC over the findings
that have both classes in the scored rows -
    * on the validation rows when the caller has a validation split;
    * otherwise by K-fold cross-validation on the training rows (`folds`, default 3), the folds made of
      whole patients when `groups` (patient ids) are given, so no patient is on both sides of a fold;
then refitted on all training rows. Ties go to the stronger regularisation (the smaller C).
A finding with a single class in training predicts its training prevalence (intercept only).

Thresholds (thresholds.py) are chosen on the validation scores, or on the out-of-fold scores of the chosen
C when there is no validation split, with the training prevalence as the fallback reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from chexfound.stats.ranking import macro_auroc
from chexfound.stats.thresholds import ThresholdChoice, choose_thresholds, label_prevalence, thresholds_of

C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int = 200,
                 tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """L2 logistic regression for every column of y at once (NaN = not labelled, masked).

    Minimises, per finding k, C * sum_i BCE(x_i w_k + b_k, y_ik) + ||w_k||^2 / 2 (intercept not penalised):
    scikit-learn's LogisticRegression(C) objective. The findings are independent, so their sum is optimised
    jointly in one L-BFGS run instead of one solver call per finding. `tol` bounds the largest gradient
    component (scikit-learn's lbfgs default). Returns (coef [K, F], intercept [K]).
    """
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    n, f = x.shape
    k = y.shape[1]
    m = ~np.isnan(y)
    t = np.where(m, y, 0.0)
    xb = np.hstack([x, np.ones((n, 1))])

    def obj(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta.reshape(f + 1, k)
        z = xb @ w
        # BCE with logits, numerically stable: softplus(z) - t z
        loss = np.where(m, np.logaddexp(0.0, z) - t * z, 0.0).sum()
        r = np.where(m, 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500))) - t, 0.0)
        g = c * (xb.T @ r)
        g[:f] += w[:f]
        val = c * loss + 0.5 * float(np.sum(w[:f] ** 2))
        return val, g.ravel()

    # The matrices are small: multi-threaded BLAS only adds synchronisation (10x slower on a busy machine).
    with threadpool_limits(1, user_api="blas"):
        res = minimize(obj, np.zeros((f + 1) * k), jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iter, "gtol": tol})
    w = res.x.reshape(f + 1, k)
    return w[:f].T.copy(), w[f].copy()


@dataclass
class LogisticProbe:
    """A fitted probe: standardisation, weights per finding, thresholds and how they were chosen."""

    coef: np.ndarray        # [C, F]
    intercept: np.ndarray   # [C]
    mean: np.ndarray        # [F] standardisation
    scale: np.ndarray       # [F]
    thresholds: np.ndarray  # [C]
    info: dict[str, Any] = field(default_factory=dict)
    threshold_choices: list[ThresholdChoice] = field(default_factory=list)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Logits [N, C]."""
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Features [N, D] -> probabilities [N, C]."""
        return 1.0 / (1.0 + np.exp(-np.clip(self.decision_function(x), -50, 50)))

    def predict(self, source: Any, idx: np.ndarray) -> np.ndarray:
        """Probabilities of rows `idx` of a feature matrix (the evaluate protocols' head interface)."""
        return self.predict_proba(np.asarray(source)[idx])

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight [C, F], bias [C]) acting on raw features: the standardisation folded into the weights."""
        w = self.coef / self.scale
        return w, self.intercept - w @ self.mean


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    return mean, scale


def _fit_columns(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """fit_logistic, with single-class columns replaced by their prevalence intercept; returns their indices."""
    coef, b = fit_logistic(x, y, c, max_iter)
    constant = []
    for j in range(y.shape[1]):
        col = y[:, j][~np.isnan(y[:, j])]
        if col.size == 0 or col.min() == col.max():
            prev = min(max(float(col.mean()) if col.size else 0.5, 1e-4), 1 - 1e-4)
            coef[j] = 0.0
            b[j] = float(np.log(prev / (1 - prev)))
            constant.append(j)
    return coef, b, constant


def _map(fn: Callable[[float], Any], values: Sequence[float], n_jobs: int) -> list[Any]:
    """fn over values, in `n_jobs` threads (the solver's matrix products release the GIL)."""
    if n_jobs <= 1 or len(values) < 2:
        return [fn(v) for v in values]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(n_jobs, len(values))) as pool:
        return list(pool.map(fn, values))


def patient_folds(groups: Sequence[Any] | np.ndarray | None, n: int, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) per row; whole clusters (patients) per fold; rows are their own cluster if None."""
    g = np.arange(n).astype(str) if groups is None else np.asarray(groups).astype(str)
    uniq, inv = np.unique(g, return_inverse=True)
    perm = np.random.default_rng(seed).permutation(uniq.size)
    fold_of_cluster = np.empty(uniq.size, dtype=np.int64)
    fold_of_cluster[perm] = np.arange(uniq.size) % k
    return fold_of_cluster[inv.ravel()]


def fit_probe(
    x: np.ndarray,
    y: np.ndarray,
    train_idx: np.ndarray | None = None,
    val_idx: np.ndarray | None = None,
    groups: Sequence[Any] | np.ndarray | None = None,
    *,
    c_grid: Sequence[float] = C_GRID,
    folds: int = 3,
    max_iter: int = 200,
    seed: int = 0,
    threshold_method: str = "f1",
    findings: Sequence[str] | None = None,
    n_jobs: int = 1,
) -> LogisticProbe:
    """Fit the logistic probe on rows `train_idx` of x [N, F] / y [N, C] (NaN = unlabelled), choosing C as
    the module docstring says. `groups` (patient ids, [N]) make the cross-validation folds patient-disjoint;
    `n_jobs` threads fit the grid's C values in parallel (same result)."""
    feats = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    tr = np.arange(len(feats)) if train_idx is None else np.asarray(train_idx)
    va = None if val_idx is None or len(val_idx) == 0 else np.asarray(val_idx)
    grid = sorted(float(c) for c in c_grid)
    mean, scale = _standardise(feats[tr])
    xs = (feats - mean) / scale
    yt = y[tr]
    scores: dict[str, float] = {}
    oof: dict[float, np.ndarray] = {}
    fits: dict[float, tuple[np.ndarray, np.ndarray, list[int]]] = {}
    if va is not None:
        selection = "validation macro AUROC"
        fits = dict(zip(grid, _map(lambda c: _fit_columns(xs[tr], yt, c, max_iter), grid, n_jobs)))
        scores = {str(c): macro_auroc(y[va], xs[va] @ fits[c][0].T + fits[c][1]) for c in grid}
    elif folds >= 2 and len(grid) > 1 and len(tr) >= 2 * folds:
        fold = patient_folds(None if groups is None else np.asarray(groups)[tr], len(tr), folds, seed)
        selection = f"{folds}-fold cross-validated macro AUROC" + (" (patient folds)" if groups is not None else "")

        def out_of_fold(c: float) -> np.ndarray:
            pred = np.full(yt.shape, np.nan)
            for f in range(folds):
                inn, out = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
                m, s = _standardise(feats[tr][inn])
                coef, b, _ = _fit_columns((feats[tr][inn] - m) / s, yt[inn], c, max_iter)
                pred[out] = ((feats[tr][out] - m) / s) @ coef.T + b
            return pred

        oof = dict(zip(grid, _map(out_of_fold, grid, n_jobs)))
        scores = {str(c): macro_auroc(yt, oof[c]) for c in grid}
    else:
        selection = "none (no validation rows, too few for cross-validation): middle of the grid"
        grid = [grid[len(grid) // 2]]
    best = max(grid, key=lambda c: (-np.inf if np.isnan(scores.get(str(c), np.nan)) else scores[str(c)], -c))
    coef, b, constant = fits[best] if best in fits else _fit_columns(xs[tr], yt, best, max_iter)
    probe = LogisticProbe(coef, b, mean, scale, np.full(y.shape[1], 0.5))
    prev = label_prevalence(yt)
    if va is not None:
        probe.threshold_choices = choose_thresholds(y[va], probe.predict(feats, va), threshold_method, prev, findings)
        thr_source = "validation scores"
    elif best in oof:
        probs = 1.0 / (1.0 + np.exp(-np.clip(oof[best], -50, 50)))
        probe.threshold_choices = choose_thresholds(yt, probs, threshold_method, prev, findings)
        thr_source = "out-of-fold training scores"
    else:
        thr_source = "none: 0.5"
    if probe.threshold_choices:
        probe.thresholds = thresholds_of(probe.threshold_choices)
    probe.info = {"trainer": "logistic", "C": best, "c_grid": [float(c) for c in c_grid],
                  "selection": selection, "selection_scores": scores, "n_train": int(len(tr)),
                  "n_val": 0 if va is None else int(len(va)), "constant_columns": constant,
                  "thresholds_from": thr_source,
                  "threshold_rule": [c.describe() for c in probe.threshold_choices] or "0.5 (no scores to choose on)"}
    return probe


@dataclass
class LogisticTrainer:
    """`fit_probe` behind the evaluate protocols' trainer interface: fit(source, y, train_idx, val_idx, seed)."""

    c_grid: Sequence[float] = C_GRID
    max_iter: int = 200  # as scikit-learn, stop early on separable data rather than chase infinite weights
    threshold_method: str = "f1"
    findings: Sequence[str] | None = None  # names for the threshold records
    name: str = "logistic"

    def fit(self, source: Any, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray | None,
            seed: int = 0, groups: Sequence[Any] | np.ndarray | None = None) -> LogisticProbe:
        """Fit the probe on rows `train_idx` of the feature matrix `source` (C chosen by patient-grouped cross-
        validation; thresholds on `val_idx` when given)."""
        probe = fit_probe(np.asarray(source), y, train_idx, val_idx, groups, c_grid=self.c_grid,
                          max_iter=self.max_iter, seed=seed, threshold_method=self.threshold_method,
                          findings=self.findings)
        probe.info["trainer"] = self.name
        return probe
