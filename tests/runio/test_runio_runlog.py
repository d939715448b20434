"""RunLog / read_jsonl: one row format (kind + ISO-8601 UTC time), torn lines, resume, ranks."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from chexfound.runio import RunLog, read_jsonl, utc_now


def test_rows_carry_kind_and_an_iso_utc_time_and_are_json_safe(tmp_path):
    log = RunLog(tmp_path / "run" / "metrics.jsonl")
    before = dt.datetime.now(dt.timezone.utc)
    row = log.write("train", iteration=1, loss=np.float32(2.5), grad_norm=float("nan"))
    after = dt.datetime.now(dt.timezone.utc)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == row
    assert list(row)[:2] == ["kind", "time"] and row["kind"] == "train"
    assert row["loss"] == 2.5 and row["grad_norm"] is None  # strict JSON, no NaN token
    t = dt.datetime.fromisoformat(row["time"])
    assert t.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(milliseconds=1) <= t <= after
    assert dt.datetime.fromisoformat(utc_now()).tzinfo is not None


def test_kind_and_time_are_the_logs_own_fields(tmp_path):
    with pytest.raises(TypeError, match="kind"):
        RunLog(tmp_path / "m.jsonl").write("train", time=3)


def test_rows_are_readable_while_the_run_goes(tmp_path):
    log = RunLog(tmp_path / "m.jsonl")
    for i in range(3):
        log.write("train", iteration=i)
        assert [r["iteration"] for r in read_jsonl(tmp_path / "m.jsonl")] == list(range(i + 1))


def test_a_torn_line_is_skipped_and_the_next_row_starts_on_its_own_line(tmp_path):
    path = tmp_path / "m.jsonl"
    log = RunLog(path)
    log.write("train", iteration=1)
    with open(path, "a") as f:
        f.write('{"kind": "train", "iteration": 2, "lo')  # killed mid-write
    assert [r["iteration"] for r in read_jsonl(path)] == [1]
    RunLog(path).write("train", iteration=2)  # the resumed run
    assert [r["iteration"] for r in read_jsonl(path)] == [1, 2]
    assert path.read_text().count("\n") == 3  # the torn line stays apart, whole rows stay whole


def test_read_jsonl_missing_file_and_garbage(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl") == []
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json at all\n{"a": 2}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1 is not a JSON object"):
        read_jsonl(tmp_path / "list.jsonl")


def test_truncate_after_drops_rows_past_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    log = RunLog(path)
    log.write("config", note="no iteration: kept")
    for i in range(1, 6):
        log.write("train", iteration=i)
    log.write("probe", iteration=4, auroc=0.7)
    with open(path, "a") as f:
        f.write('{"kind": "train", "itera')
    resumed = RunLog(path)
    resumed.truncate_after(3)
    rows = read_jsonl(path)
    assert [(r["kind"], r.get("iteration")) for r in rows] == [("config", None), ("train", 1), ("train", 2),
                                                               ("train", 3)]
    assert path.read_text().endswith("\n") and path.read_text().count("\n") == 4  # the torn line is gone
    resumed.write("train", iteration=4)
    assert [r.get("iteration") for r in read_jsonl(path)] == [None, 1, 2, 3, 4]


def test_clear_starts_afresh(tmp_path):
    log = RunLog(tmp_path / "m.jsonl")
    log.write("train", iteration=1)
    log.clear()
    assert not (tmp_path / "m.jsonl").exists()
    log.clear()  # nothing there: fine
    log.write("train", iteration=1)
    assert len(read_jsonl(tmp_path / "m.jsonl")) == 1


def test_a_disabled_log_off_rank_0_touches_nothing(tmp_path):
    path = tmp_path / "m.jsonl"
    RunLog(path).write("train", iteration=1)
    other_rank = RunLog(path, enabled=False)
    assert other_rank.write("train", iteration=2) is None
    other_rank.truncate_after(0)
    other_rank.clear()
    assert [r["iteration"] for r in read_jsonl(path)] == [1]
