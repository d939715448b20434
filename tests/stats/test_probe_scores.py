"""The pretraining probes' statistics (moved from tests/ssl/test_probe.py with the code into chexfound.stats)."""

import numpy as np
from sklearn.metrics import roc_auc_score

from chexfound.stats import BootstrapConfig, RankedScores, bootstrap_multilabel, fit_probe, knn_scores
from chexfound.stats.ranking import macro_auroc


def test_vectorised_auroc_equals_sklearn_with_ties():
    # Many resamples at once: each row of integer weights is a resample of the same tied scores.
    rng = np.random.default_rng(0)
    y = (rng.random(50) < 0.4).astype(float)
    s = np.round(rng.random(50) * 5) / 5  # many ties
    w = rng.integers(0, 3, (20, 50)).astype(float)
    w[:, :2] = 1  # every resample keeps a few rows of each class
    w[:, np.flatnonzero(y == 1)[:1]] = 1
    w[:, np.flatnonzero(y == 0)[:1]] = 1
    got = RankedScores(y, s).auroc_ap(w)[0]
    want = [roc_auc_score(np.repeat(y, w[i].astype(int)), np.repeat(s, w[i].astype(int))) for i in range(20)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    only_pos = np.where(y == 1, 1.0, 0.0)[None]  # a resample without negatives
    assert np.isnan(RankedScores(y, s).auroc_ap(only_pos)[0])[0]


def test_probes_separate_separable_features_and_ci_brackets():
    rng = np.random.default_rng(1)
    y = (rng.random(200) < 0.5).astype(np.float32)[:, None]
    f = rng.normal(size=(200, 8)) + 1.5 * y  # class shifts every feature
    s = fit_probe(f[:120], y[:120]).decision_function(f[120:])
    auc = macro_auroc(y[120:], s)
    lo, hi = bootstrap_multilabel(y[120:], s, ["A"], None, cfg=BootstrapConfig(n_boot=1000))["macro"]["auroc_ci"]
    assert auc > 0.9 and lo <= auc <= hi
    assert macro_auroc(y[120:], knn_scores(f[:120], y[:120], f[120:], k=10)) > 0.9


def test_knn_votes_only_with_labelled_neighbours():
    # column 0 labelled everywhere, column 1 only on the far cluster: near test rows get no vote there (NaN),
    # not a negative one; labelled neighbours give the weighted positive share
    ftr = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    ytr = np.array([[1, np.nan], [0, np.nan], [1, 1], [1, 0]], dtype=float)
    fte = np.array([[1.0, 0.05], [0.05, 1.0]])
    s = knn_scores(ftr, ytr, fte, k=2)
    assert np.isnan(s[0, 1]) and 0 < s[0, 0] < 1 and s[1, 0] == 1.0 and 0 < s[1, 1] < 1
