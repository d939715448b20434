"""Post-hoc calibration fitted on validation scores: temperature, Platt, strictly monotone isotonic.

Calibrators (per finding of a multilabel/binary head; a multiclass head gets one temperature):
    "none"         p unchanged
    "temperature"  sigmoid(logit(p) / T), T > 0 (softmax(z / T) for multiclass)
    "platt"        sigmoid(a logit(p) + b), a > 0 (a fit with a <= 0 would invert the ranking: not a candidate)
    "isotonic"     pool-adjacent-violators on the validation scores, made *strictly* monotone: the knots are the
                   (mean score, observed rate) of each pooled block, joined by straight lines, with anchors (0, 0)
                   and (1, 1) at the ends and block rates clipped into [1/(2(n+1)), 1 - 1/(2(n+1))]. Plain
                   isotonic regression is a step function: it ties every score in a block, which changes AUROC;
                   piecewise-linear interpolation between strictly increasing knots keeps the order of distinct
                   scores (scores tied before stay tied), so AUROC does not change.
All three are monotone increasing, so rankings (AUROC, AP) are unchanged.

The rule (`CalibrationPolicy`): with fewer than `min_positives` (10) labelled validation positives or negatives
no calibrator is fitted ("none", and the record says why). Otherwise each candidate is scored by its
`folds`-fold (5) cross-validated log-loss on the validation split (stratified folds, deterministic), isotonic
only with >= `isotonic_min` (50) positives and negatives; the simplest candidate (none < temperature < platt <
isotonic) whose cross-validated log-loss is within `tolerance` (0.002 nats) of the best is chosen and refitted
on the whole validation split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from sklearn.isotonic import isotonic_regression

from chexfound.stats.calibration import EPS, logit

METHODS = ("none", "temperature", "platt", "isotonic")


@dataclass(frozen=True)
class CalibrationPolicy:
    """When and how a calibrator is chosen on validation data."""

    min_positives: int = 10       # labelled validation positives (and negatives) needed to fit anything
    isotonic_min: int = 50        # ... and to consider isotonic regression
    folds: int = 5                # cross-validation folds for the choice
    tolerance: float = 0.002      # nats of CV log-loss a more complex calibrator must win by

    def describe(self) -> str:
        return (f"lowest {self.folds}-fold cross-validated validation log-loss among none/temperature/platt/"
                f"isotonic (isotonic with >= {self.isotonic_min} positives and negatives), the simplest within "
                f"{self.tolerance} nats of the best; none with < {self.min_positives} validation positives or "
                "negatives")


@dataclass
class CalibrationChoice:
    """One finding's calibrator: method, parameters and the evidence behind the choice."""

    finding: str
    method: str
    reason: str
    temperature: float = 1.0          # temperature: p' = sigmoid(logit(p) / T)
    scale: float = 1.0                # platt / temperature as an affine map on logits: sigmoid(scale z + bias)
    bias: float = 0.0
    knots_x: list[float] = field(default_factory=list)  # isotonic: strictly increasing knots on [0, 1]
    knots_y: list[float] = field(default_factory=list)
    cv_log_loss: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cv_log_loss"] = {k: (None if not np.isfinite(v) else v) for k, v in self.cv_log_loss.items()}
        return d

    def apply(self, p: np.ndarray) -> np.ndarray:
        return apply_binary(self, p)


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


def _nll(y: np.ndarray, eta: np.ndarray) -> float:
    return float(np.sum(np.logaddexp(0, eta) - y * eta))


def fit_affine(y: np.ndarray, z: np.ndarray, with_bias: bool, iters: int = 100) -> tuple[float, float]:
    """Maximum-likelihood (scale, bias) of sigmoid(scale z + bias); bias = 0 without `with_bias` (temperature).
    Newton steps, halved until the likelihood improves (plain Newton overshoots on saturated logits)."""
    s, b = 1.0, 0.0
    cur = _nll(y, s * z + b)
    for _ in range(iters):
        mu = _sigmoid(s * z + b)
        r, v = y - mu, np.maximum(mu * (1 - mu), 1e-12)
        gs, hss = float(r @ z), float(v @ (z * z)) + 1e-9
        if with_bias:
            gb, hbb, hsb = float(r.sum()), float(v.sum()) + 1e-9, float(v @ z)
            det = hss * hbb - hsb * hsb
            ds, db = (hbb * gs - hsb * gb) / det, (hss * gb - hsb * gs) / det
        else:
            ds, db = gs / hss, 0.0
        step = 1.0
        while step > 1e-6:
            new = _nll(y, (s + step * ds) * z + b + step * db)
            if new <= cur:
                break
            step /= 2
        else:
            break
        s, b, cur = s + step * ds, b + step * db, new
        if abs(step * ds) < 1e-10 and abs(step * db) < 1e-10:
            break
    return float(s), float(b)


def fit_isotonic(y: np.ndarray, p: np.ndarray) -> tuple[list[float], list[float]]:
    """Strictly increasing knots (x, y) on [0, 1] from pool-adjacent-violators (see the module docstring)."""
    order = np.argsort(p, kind="stable")
    ps, ys = np.asarray(p, dtype=np.float64)[order], np.asarray(y, dtype=np.float64)[order]
    # Tied scores share one value: pool them first, so a block never splits a tie.
    ux, start, counts = np.unique(ps, return_index=True, return_counts=True)
    ysum = np.add.reduceat(ys, start)
    fitted = isotonic_regression(ysum / counts, sample_weight=counts.astype(np.float64), increasing=True)
    edges = np.r_[0, np.flatnonzero(np.diff(fitted) > 0) + 1, len(fitted)]
    xs, vs = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        w = counts[a:b]
        xs.append(float(np.sum(ux[a:b] * w) / w.sum()))
        vs.append(float(fitted[a]))
    eps = 1.0 / (2 * (len(ys) + 1))
    vs = list(np.clip(vs, eps, 1 - eps))
    kx, ky = xs, vs
    if kx[0] > 0:
        kx, ky = [0.0] + kx, [0.0] + ky
    if kx[-1] < 1:
        kx, ky = kx + [1.0], ky + [1.0]
    return [float(v) for v in kx], [float(v) for v in ky]


def apply_binary(c: CalibrationChoice, p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if c.method == "none":
        return p
    if c.method == "isotonic":
        return np.interp(p, c.knots_x, c.knots_y)
    return _sigmoid(c.scale * logit(p) + c.bias)


def _fit(method: str, y: np.ndarray, p: np.ndarray, name: str = "") -> CalibrationChoice:
    if method == "none":
        return CalibrationChoice(name, "none", "")
    if method == "isotonic":
        kx, ky = fit_isotonic(y, p)
        return CalibrationChoice(name, "isotonic", "", knots_x=kx, knots_y=ky)
    s, b = fit_affine(y, logit(p), with_bias=method == "platt")
    if not (np.isfinite(s) and np.isfinite(b)) or s <= 0:
        raise ValueError(f"{method} fit is not increasing (scale {s:.3g})")
    return CalibrationChoice(name, method, "", temperature=1.0 / s if method == "temperature" else 1.0, scale=s, bias=b)


def _folds(y: np.ndarray, k: int) -> np.ndarray:
    """Stratified, deterministic fold ids: positives and negatives dealt round-robin in input order."""
    f = np.empty(len(y), dtype=np.int64)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        f[idx] = np.arange(len(idx)) % k
    return f


def choose_calibrator(y: np.ndarray, p: np.ndarray, finding: str = "",
                      policy: CalibrationPolicy = CalibrationPolicy()) -> CalibrationChoice:
    """The calibrator of one finding from validation labels y (1/0/NaN) and probabilities p (the stated rule)."""
    y, p = np.asarray(y, dtype=np.float64).ravel(), np.asarray(p, dtype=np.float64).ravel()
    m = ~np.isnan(y) & np.isfinite(p)
    y, p = (y[m] == 1).astype(np.float64), p[m]
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if min(n_pos, n_neg) < policy.min_positives:
        return CalibrationChoice(finding, "none", f"{n_pos} validation positives / {n_neg} negatives "
                                                  f"(< {policy.min_positives}): too few to fit a calibrator")
    cands = ["none", "temperature", "platt"] + (["isotonic"] if min(n_pos, n_neg) >= policy.isotonic_min else [])
    folds = _folds(y, policy.folds)
    cv: dict[str, float] = {}
    for meth in cands:
        held = np.empty_like(p)
        try:
            for k in range(policy.folds):
                tr, te = folds != k, folds == k
                held[te] = _fit(meth, y[tr], p[tr]).apply(p[te])
            cv[meth] = log_loss(y, held)
        except ValueError:
            cv[meth] = float("nan")
    finite = {k: v for k, v in cv.items() if np.isfinite(v)}
    best = min(finite.values())
    chosen = next(k for k in cands if k in finite and finite[k] <= best + policy.tolerance)
    try:
        out = _fit(chosen, y, p, finding)
    except ValueError:
        out, chosen = CalibrationChoice(finding, "none", ""), "none"
    out.cv_log_loss = cv
    out.reason = (f"{policy.folds}-fold CV log-loss " + ", ".join(f"{k} {v:.4f}" for k, v in finite.items())
                  + f"; {n_pos} validation positives")
    return out


def choose_calibrators(y_val: np.ndarray, p_val: np.ndarray, findings: Sequence[str],
                       policy: CalibrationPolicy = CalibrationPolicy()) -> list[CalibrationChoice]:
    """One `CalibrationChoice` per column of validation labels [N, C] (NaN = unlabelled) and probabilities."""
    y = np.asarray(y_val, dtype=np.float64).reshape(len(y_val), -1)
    p = np.asarray(p_val, dtype=np.float64).reshape(len(p_val), -1)
    return [choose_calibrator(y[:, c], p[:, c], f, policy) for c, f in enumerate(findings)]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature_multiclass(t: np.ndarray, p: np.ndarray) -> float:
    """One temperature T for softmax(log p / T) by maximum likelihood over class indices t (damped Newton on 1/T)."""
    z = np.log(np.clip(p, EPS, 1.0))
    rows = np.arange(len(t))

    def nll(s: float) -> float:
        q = s * z
        return float(np.sum(np.log(np.exp(q - q.max(1, keepdims=True)).sum(1)) + q.max(1) - q[rows, t]))

    s, cur = 1.0, nll(1.0)
    for _ in range(100):
        q = _softmax(s * z)
        ez = (q * z).sum(1)
        g = float(np.sum(z[rows, t] - ez))
        h = float(np.sum((q * z * z).sum(1) - ez ** 2)) + 1e-9
        step = 1.0
        while step > 1e-6 and nll(s + step * g / h) > cur:
            step /= 2
        if step <= 1e-6:
            break
        s, cur = s + step * g / h, nll(s + step * g / h)
        if abs(step * g / h) < 1e-10:
            break
    return 1.0 / s if s > 0 and np.isfinite(s) else float("nan")


def choose_multiclass_temperature(t: np.ndarray, p: np.ndarray,
                                  policy: CalibrationPolicy = CalibrationPolicy()) -> dict[str, Any]:
    """{"method": "temperature" | "none", "temperature", "reason", "cv_log_loss"} for a multiclass head: one
    temperature, kept when its cross-validated log-loss beats none by `tolerance`."""
    t = np.asarray(t, dtype=np.float64)
    m = ~np.isnan(t)
    t, p = t[m].astype(np.int64), np.asarray(p, dtype=np.float64)[m]
    counts = np.bincount(t, minlength=p.shape[1])
    if counts.min() < policy.min_positives:
        return {"method": "none", "temperature": 1.0, "reason": f"smallest class has {int(counts.min())} validation "
                f"images (< {policy.min_positives}): too few to fit a calibrator", "cv_log_loss": {}}
    folds = np.arange(len(t)) % policy.folds
    held = np.empty_like(p)
    for k in range(policy.folds):
        tr, te = folds != k, folds == k
        temp = fit_temperature_multiclass(t[tr], p[tr])
        held[te] = _softmax(np.log(np.clip(p[te], EPS, 1)) / (temp if np.isfinite(temp) else 1.0))

    def nll(q: np.ndarray) -> float:
        return float(-np.mean(np.log(np.clip(q[np.arange(len(t)), t], EPS, 1))))

    cv = {"none": nll(p), "temperature": nll(held)}
    temp = fit_temperature_multiclass(t, p)
    use = np.isfinite(temp) and cv["temperature"] < cv["none"] - policy.tolerance
    return {"method": "temperature" if use else "none", "temperature": float(temp) if use else 1.0,
            "reason": f"{policy.folds}-fold CV log-loss none {cv['none']:.4f}, temperature {cv['temperature']:.4f}",
            "cv_log_loss": cv}
