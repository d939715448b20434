"""bench/_timing.py, the one timing toolkit of the benches, driven with fake clocks (no real time is asserted)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest

from _run import REPO

sys.path.insert(0, str(REPO / "bench"))
import _timing  # noqa: E402


def fake_clock(ticks: list[float]):
    it = iter(ticks)
    return lambda: next(it)


def test_best_seconds_keeps_the_least_disturbed_round() -> None:
    calls = []
    # rounds of 3 calls: (0 -> 6), (10 -> 13), (20 -> 29): 2, 1 and 3 s per call
    t = _timing.best_seconds(lambda: calls.append(1), iters=3, warmup=2, clock=fake_clock([0, 6, 10, 13, 20, 29]),
                             calls=3)
    assert t == 1.0 and len(calls) == 2 + 9


def test_stopwatch_and_rate_use_the_given_clock() -> None:
    with _timing.Stopwatch(clock=fake_clock([5.0, 7.5])) as sw:
        pass
    assert sw.seconds == 2.5
    n = itertools.count()
    assert _timing.rate(lambda: next(n), seconds=0.0, min_calls=4, clock=fake_clock([0.0, 2.0])) == 2.0
    assert next(n) == 4


def test_interleaved_rates_count_items_per_function() -> None:
    r = _timing.interleaved_rates({"a": lambda: 3, "b": lambda: 1}, seconds=0.0, rounds=2)
    assert set(r) == {"a", "b"} and r["a"] > 0 and r["b"] > 0


@pytest.mark.slow  # a fresh Python process
def test_smoke_mode_reaches_processes_started_afterwards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHEXFOUND_MODEL_MODULES", raising=False)
    _timing.smoke_mode()
    assert "chexfound.models.testing" in os.environ["CHEXFOUND_MODEL_MODULES"].split(",")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", "from chexfound.models import get_config; "
                          "print(get_config('tiny_vit').embed_dim)"], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "64", out.stderr
