"""Regression metrics over non-NaN targets: MAE, RMSE, R^2."""

from __future__ import annotations

import numpy as np


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R^2 (coefficient of determination, as sklearn's r2_score) over non-NaN targets."""
    y, pred = np.asarray(y, dtype=np.float64).ravel(), np.asarray(pred, dtype=np.float64).ravel()
    m = ~np.isnan(y)
    y, pred = y[m], pred[m]
    if y.size == 0:
        return {"n": 0, "mae": float("nan"), "rmse": float("nan"), "r2": float("nan")}
    err = pred - y
    ss_res = float(np.sum(err**2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    # sklearn convention: a constant target gives R^2 = 1 for a perfect fit, 0 otherwise.
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return {"n": int(y.size), "mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2))),
            "r2": r2}
