"""The head-training step of every protocol, behind one small interface.

A protocol only needs: fit a head on some training rows (choosing hyper-parameters and decision thresholds
on validation rows), then predict probabilities for other rows, possibly of another dataset (OOD).

    model = trainer.fit(source, y, train_idx, val_idx, seed)
    probs = model.predict(source_or_other, idx)        # [len(idx), C]
    model.thresholds                                    # [C], chosen on val

`source` is whatever the trainer reads features from: a [N, F] array for `LogisticTrainer`, the adapt
stage's feature cache for `AdaptTrainer`. Thresholds maximise F1 on the validation rows (the usual choice
for CXR multi-label reporting); with no usable validation labels a finding keeps 0.5.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from chexfound.evaluate.ranking import RankedScores

log = logging.getLogger(__name__)


class FittedHead(Protocol):
    thresholds: np.ndarray
    info: dict[str, Any]

    def predict(self, source: Any, idx: np.ndarray) -> np.ndarray: ...


class HeadTrainer(Protocol):
    name: str

    def fit(self, source: Any, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray | None,
            seed: int = 0) -> FittedHead: ...


def best_f1_thresholds(y: np.ndarray, p: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per column, the score threshold (predict positive when p >= t) that maximises F1 on labelled rows."""
    y, p = np.atleast_2d(y.T).T, np.atleast_2d(p.T).T
    out = np.full(y.shape[1], default, dtype=np.float64)
    for c in range(y.shape[1]):
        m = ~np.isnan(y[:, c])
        yc, pc = y[m, c], p[m, c]
        n_pos = yc.sum()
        if n_pos == 0 or n_pos == yc.size:
            continue
        order = np.argsort(-pc, kind="stable")
        ys, ps = yc[order], pc[order]
        tp = np.cumsum(ys)
        fp = np.cumsum(1 - ys)
        last = np.r_[ps[1:] != ps[:-1], True]  # evaluate only at the end of each tie group
        f1 = 2 * tp / (tp + fp + n_pos)
        f1 = np.where(last, f1, -1)
        out[c] = float(ps[int(np.argmax(f1))])
    return out


def train_and_predict(trainer: HeadTrainer, source: Any, y: np.ndarray, train_idx: np.ndarray,
                      test_idx: np.ndarray, val_idx: np.ndarray | None = None, seed: int = 0,
                      test_source: Any = None) -> tuple[np.ndarray, FittedHead]:
    """Fit on train (select on val) and return test probabilities [len(test_idx), C] and the fitted head."""
    model = trainer.fit(source, y, train_idx, val_idx, seed)
    return model.predict(source if test_source is None else test_source, test_idx), model


# --- a self-contained probe (scikit-learn logistic regression on pooled features) --------------------------

@dataclass
class LogisticHead:
    coef: np.ndarray        # [C, F]
    intercept: np.ndarray   # [C]
    mean: np.ndarray        # [F] standardisation
    scale: np.ndarray       # [F]
    thresholds: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, source: Any, idx: np.ndarray) -> np.ndarray:
        x = (np.asarray(source)[idx] - self.mean) / self.scale
        z = x @ self.coef.T + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int = 200,
                 tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """L2 logistic regression for every column of y at once (NaN = not labelled, masked).

    Minimises, per finding k, C * sum_i BCE(x_i w_k + b_k, y_ik) + ||w_k||^2 / 2 (intercept not penalised):
    scikit-learn's LogisticRegression(C) objective. The findings are independent, so their sum is optimised
    jointly in one L-BFGS run instead of one solver call per finding. `tol` bounds the largest gradient
    component (scikit-learn's lbfgs default). Returns (coef [K, F], intercept [K]).
    """
    from scipy.optimize import minimize

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

    from threadpoolctl import threadpool_limits

    # The matrices are small: multi-threaded BLAS only adds synchronisation (10x slower on a busy machine).
    with threadpool_limits(1, user_api="blas"):
        res = minimize(obj, np.zeros((f + 1) * k), jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iter, "gtol": tol})
    w = res.x.reshape(f + 1, k)
    return w[:f].T.copy(), w[f].copy()


@dataclass
class LogisticTrainer:
    """L2 logistic regression per finding on standardised features (`fit_logistic`); the inverse
    regularisation C is picked from a grid by validation macro AUROC (one C for all findings, like the
    original's single learning rate per head). A finding with a single class in training predicts its
    training prevalence (its intercept), as an unregularised intercept-only model would."""

    c_grid: Sequence[float] = (0.01, 0.1, 1.0)
    max_iter: int = 200  # as scikit-learn, stop early on separable data rather than chase infinite weights
    name: str = "logistic"

    def _fit_all(self, x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
        coef, b = fit_logistic(x, y, c, self.max_iter)
        for j in range(y.shape[1]):
            col = y[:, j][~np.isnan(y[:, j])]
            if col.size == 0 or col.min() == col.max():
                prev = min(max(float(col.mean()) if col.size else 0.5, 1e-4), 1 - 1e-4)
                coef[j] = 0.0
                b[j] = float(np.log(prev / (1 - prev)))
        return coef, b

    def fit(self, source: Any, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray | None,
            seed: int = 0) -> LogisticHead:
        feats = np.asarray(source, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        y = y[:, None] if y.ndim == 1 else y
        xt = feats[train_idx]
        mean = xt.mean(axis=0)
        scale = xt.std(axis=0)
        scale[scale < 1e-8] = 1.0
        xt = (xt - mean) / scale
        yt = y[train_idx]
        grid = list(self.c_grid)
        best: tuple[float, float, np.ndarray, np.ndarray] | None = None
        val_scores: dict[str, float] = {}
        have_val = val_idx is not None and len(val_idx) > 0
        # Without validation rows there is nothing to select on: use the middle of the grid.
        for c in grid if have_val else grid[len(grid) // 2 : len(grid) // 2 + 1]:
            coef, b = self._fit_all(xt, yt, c)
            score = float("nan")
            if have_val:
                head = LogisticHead(coef, b, mean, scale, np.full(y.shape[1], 0.5))
                pv = head.predict(feats, val_idx)
                aucs = []
                for k in range(y.shape[1]):
                    m = ~np.isnan(y[val_idx, k])
                    a = RankedScores(y[val_idx, k][m], pv[m, k]).auroc_ap()[0][0] if m.any() else np.nan
                    if not np.isnan(a):
                        aucs.append(a)
                score = float(np.mean(aucs)) if aucs else float("nan")
            val_scores[str(c)] = score
            key = -np.inf if np.isnan(score) else score
            if best is None or key > best[0]:
                best = (key, c, coef, b)
        assert best is not None
        _, c_best, coef, b = best
        head = LogisticHead(coef, b, mean, scale, np.full(y.shape[1], 0.5))
        if have_val:
            head.thresholds = best_f1_thresholds(y[val_idx], head.predict(feats, val_idx))
        head.info = {"trainer": self.name, "C": c_best, "val_macro_auroc": val_scores,
                     "n_train": int(len(train_idx)), "n_val": int(len(val_idx)) if have_val else 0,
                     "threshold_rule": "max F1 on val" if have_val else "0.5 (no val)"}
        return head
