"""How `chexfound adapt` turns manifest columns into targets for each task."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from chexfound.adapt.labels import split_manifests, task_labels
from chexfound.adapt.options import AdaptOptions
from chexfound.errors import ConfigError, ManifestError


@pytest.fixture()
def manifest(tmp_path):
    df = pd.DataFrame({
        "path": [f"img{i}.png" for i in range(8)], "patient_id": [f"p{i // 2}" for i in range(8)],
        "kind": ["virus", "normal", None, "bacteria", "normal", "virus", "normal", "bacteria"],
        "A": [1, 0, 0, None, 1, 0, 0, 0], "B": [0, 1, 0, None, 0, 0, 1, 1], "C": [0, 0, 1, None, 0, 1, 0, 0],
        "age": [50, 61.5, None, 33, 70, 45, 52, 48], "event": [1, 0, 1, 1, 0, 0, 1, 0],
        "split": ["train", "train", "val", "train", "test", "train", "val", "train"],
    })
    df.to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def _opts(path, **kw):
    return AdaptOptions(train=str(path), out="unused", config="tiny_vit", **kw)


def test_multiclass_from_names_and_from_one_hot(manifest):
    tr, va = split_manifests(_opts(manifest, task="multiclass", labels=["kind"]))
    assert len(tr) == 5 and len(va) == 2  # the split column: test rows are left out
    y, names = task_labels(tr, "multiclass", "nan")
    assert names == ["bacteria", "normal", "virus"]
    np.testing.assert_array_equal(y, [2, 1, 0, 2, 0])
    yv, _ = task_labels(va, "multiclass", "nan", classes=names)
    assert np.isnan(yv[0]) and yv[1] == 1
    tr, _ = split_manifests(_opts(manifest, task="multiclass", labels=["A", "B", "C"]))
    y, names = task_labels(tr, "multiclass", "nan")
    assert names == ["A", "B", "C"] and np.isnan(y[2]) and y.tolist()[:2] == [0, 1]


def test_regression_survival_and_errors(manifest):
    tr, _ = split_manifests(_opts(manifest, task="regression", labels=["age"]))
    y, names = task_labels(tr, "regression", "nan")
    assert names == ["age"] and y.shape == (5, 1) and y[1, 0] == 61.5
    tr, _ = split_manifests(_opts(manifest, task="survival", labels=["age", "event"]))
    y, names = task_labels(tr, "survival", "nan")
    assert names == ["risk"] and y.shape == (5, 2)
    with pytest.raises(ManifestError, match="two label columns"):
        task_labels(split_manifests(_opts(manifest, task="survival", labels=["age"]))[0], "survival", "nan")
    with pytest.raises(ConfigError, match="needs --labels"):
        split_manifests(_opts(manifest, task="regression"))
    with pytest.raises(ManifestError, match="allowed"):  # 0/1/-1 columns are validated for multilabel
        split_manifests(_opts(manifest, task="multilabel", labels=["age"]))
