import numpy as np
from sklearn.metrics import roc_auc_score

from chexfound.ssl.probe import auroc_rows, bootstrap_ci, knn_scores, linear_probe_scores, mean_auroc


def test_vectorised_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = (rng.random((20, 50)) < 0.4).astype(float)
    s = np.round(rng.random((20, 50)) * 5) / 5  # many ties
    got = auroc_rows(y, s)
    want = [roc_auc_score(y[i], s[i]) for i in range(20)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isnan(auroc_rows(np.ones((1, 5)), rng.random((1, 5))))[0]


def test_probes_separate_separable_features_and_ci_brackets():
    rng = np.random.default_rng(1)
    y = (rng.random(200) < 0.5).astype(np.float32)[:, None]
    f = rng.normal(size=(200, 8)) + 1.5 * y  # class shifts every feature
    s = linear_probe_scores(f[:120], y[:120], f[120:])
    auc = mean_auroc(s, y[120:], [0])
    lo, hi = bootstrap_ci(s, y[120:], [0])
    assert auc > 0.9 and lo <= auc <= hi
    assert mean_auroc(knn_scores(f[:120], y[:120], f[120:], k=10), y[120:], [0]) > 0.9
