"""Uncertain (-1) labels: one table, the same answer from the manifest, the head fitter and the evaluation tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chexfound.adapt.fit import _resolve_uncertain
from chexfound.data.manifest import Manifest
from chexfound.data.uncertain import UNCERTAIN_POLICIES, resolve_uncertain, uncertain_fill
from chexfound.evaluate.tasks import _resolve

RAW = np.array([[1, -1], [0, np.nan], [-1, 1]], dtype=np.float32)


@pytest.mark.parametrize("policy, fill", [("nan", np.nan), ("zero", 0.0), ("one", 1.0)])
def test_every_owner_resolves_as_the_table_says(tmp_path: Path, policy: str, fill: float) -> None:
    want = RAW.copy()
    want[RAW == -1] = fill
    got = resolve_uncertain(RAW, policy)
    np.testing.assert_array_equal(got, want)
    assert np.isnan(RAW).sum() == 1 and (RAW == -1).sum() == 2  # the input is untouched
    m = Manifest(pd.DataFrame({"path": ["a", "b", "c"], "A": RAW[:, 0], "B": RAW[:, 1]}), tmp_path, ["A", "B"])
    np.testing.assert_array_equal(m.labels(policy), want)
    np.testing.assert_array_equal(_resolve_uncertain("multilabel", RAW, policy), want)
    df = pd.DataFrame({"A": RAW[:, 0], "B": RAW[:, 1]})
    _resolve(df, ["A", "B"], 0.0, policy)  # the tasks also fill blanks: here with 0
    np.testing.assert_array_equal(df.to_numpy(), np.where(np.isnan(RAW), 0.0, want))


def test_per_finding_policies_and_unknown_policies() -> None:
    m = Manifest(pd.DataFrame({"path": ["a", "b", "c"], "A": RAW[:, 0], "B": RAW[:, 1]}), Path("."), ["A", "B"])
    y = m.labels({"B": "one"})
    assert np.isnan(y[2, 0]) and y[0, 1] == 1.0
    assert UNCERTAIN_POLICIES == ("nan", "zero", "one")
    for bad in ("ones", "U-Zeros"):
        with pytest.raises(ValueError, match="use one of nan, zero, one"):
            uncertain_fill(bad)
        with pytest.raises(ValueError, match=bad):
            m.labels(bad)  # type: ignore[arg-type]
    # regression targets keep their -1 (it is a value there, not "uncertain")
    np.testing.assert_array_equal(_resolve_uncertain("regression", RAW, "zero"), RAW)
