"""json_safe: golden conversions of what runs produce (numpy, tensors, paths, dataclasses, sets, NaN)."""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from chexfound.runio import json_safe


@dataclass
class _Row:
    finding: str
    auroc: float
    ci: tuple[float, float] = (0.1, 0.9)
    extra: dict = field(default_factory=dict)


class _Kind(enum.Enum):
    BINARY = "binary"


@pytest.mark.parametrize("value, expected", [
    (None, None), (True, True), ("x", "x"), (3, 3), (2.5, 2.5),
    (math.nan, None), (math.inf, None), (-math.inf, None),
    (np.float32(0.25), 0.25), (np.float64(np.nan), None), (np.int64(7), 7), (np.uint8(255), 255),
    (np.bool_(False), False), (np.str_("PA"), "PA"),
    (np.array([[1, 2], [3, 4]], dtype=np.int16), [[1, 2], [3, 4]]),
    (np.array([0.5, np.nan, np.inf], dtype=np.float32), [0.5, None, None]),
    (np.zeros((0, 3)), []),
    (torch.tensor([1.5, float("nan")]), [1.5, None]), (torch.tensor(3), 3), (torch.tensor(True), True),
    (PurePosixPath("/runs/a.csv"), "/runs/a.csv"),
    ((1, (2, 3)), [1, [2, 3]]),
    ({3, 10, 2}, [2, 3, 10]), (frozenset({"b", "a"}), ["a", "b"]), ({"a", 1}, [1, "a"]),
    (_Kind.BINARY, "binary"),
    (dt.datetime(2026, 11, 30, 9, 15, tzinfo=dt.timezone.utc), "2026-11-30T09:15:00+00:00"),
    (np.datetime64("2026-11-30"), "2026-11-30"),
    ({1: "a", np.int64(2): "b", "k": np.float32(1.0)}, {"1": "a", "2": "b", "k": 1.0}),
])
def test_golden_values(value, expected):
    got = json_safe(value)
    assert got == expected and type(got) is type(expected)
    json.dumps(got, allow_nan=False)  # strict JSON: the point of the function


def test_dataclasses_nested_in_containers():
    rows = [_Row("Effusion", np.float64(0.81), extra={"path": Path("x.png"), "n": np.int32(4)}),
            _Row("Mass", float("nan"), ci=(np.nan, np.float32(0.75)))]
    assert json_safe({"rows": rows}) == {"rows": [
        {"finding": "Effusion", "auroc": 0.81, "ci": [0.1, 0.9], "extra": {"path": "x.png", "n": 4}},
        {"finding": "Mass", "auroc": None, "ci": [None, 0.75], "extra": {}},
    ]}


def test_the_input_is_not_changed():
    d = {"a": [np.float32(1.0), math.nan]}
    json_safe(d)
    assert math.isnan(d["a"][1]) and isinstance(d["a"][0], np.float32)


@pytest.mark.parametrize("bad", [object(), b"bytes", 1 + 2j, _Row])
def test_what_json_cannot_hold_is_an_error_not_a_string(bad):
    with pytest.raises(TypeError):
        json_safe({"x": bad})
