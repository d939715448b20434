"""The run-folder contract: skipped.csv (and the older layouts it reads), config.yaml and the resume comparison,
`key=value` overrides, the data-folder default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chexfound.errors import ConfigError
from chexfound.runio import (SKIPPED_COLUMNS, SkippedInput, append_skipped, apply_overrides, check_run_config,
                             data_root, find_skipped, parse_override, read_run_config, read_skipped, skipped_rows,
                             write_run_config, write_skipped)


def test_skipped_csv_round_trip_and_removed_when_empty(tmp_path: Path) -> None:
    f = tmp_path / "skipped.csv"
    rows = skipped_rows("embed", [(3, "/a, b.png", 'not "an" image'), (7, "/c.dcm", "truncated")])
    assert write_skipped(f, rows) == f
    assert f.read_text().splitlines()[0] == ",".join(SKIPPED_COLUMNS)
    assert read_skipped(f) == rows  # commas and quotes survive
    assert read_skipped(f)[0] == SkippedInput("embed", 3, "/a, b.png", 'not "an" image')
    assert write_skipped(f, []) is None and not f.exists()  # a rerun that read everything leaves no stale list


def test_append_keeps_rows_across_interruptions_and_ends_a_torn_line(tmp_path: Path) -> None:
    f = tmp_path / "skipped.csv"
    append_skipped(f, skipped_rows("features", [(1, "/x.png", "bad")]))
    with open(f, "a") as h:
        h.write("features,2,/torn")  # a crash mid-row
    append_skipped(f, skipped_rows("features", [(5, "/y.png", "empty file")]))
    got = read_skipped(f)
    assert [(s.index, s.path, s.reason) for s in got] == [(1, "/x.png", "bad"), (5, "/y.png", "empty file")]


@pytest.mark.parametrize("name, text, want", [
    ("skipped.txt", "/a.png\tempty file\n", [("pre", None, "/a.png", "empty file")]),
    ("p.skipped.csv", "path,reason\n/a.png,empty file\n", [("pre", None, "/a.png", "empty file")]),
    ("x.skipped.csv", "index,path,reason\n4,/a.png,empty file\n", [("pre", 4, "/a.png", "empty file")]),
    ("skipped.csv", "split,path,reason\nval,/a.png,empty file\n", [("val", None, "/a.png", "empty file")]),
    ("errors.jsonl", json.dumps({"row": 2, "path": "/a.png", "error": "empty file"}) + "\n{torn",
     [("pre", 2, "/a.png", "empty file")]),
])
def test_older_layouts_are_read(tmp_path: Path, name: str, text: str, want: list[tuple]) -> None:
    (tmp_path / name).write_text(text)
    assert [(s.stage, s.index, s.path, s.reason) for s in read_skipped(tmp_path / name, stage="pre")] == want


def test_find_skipped_prefers_the_current_file(tmp_path: Path) -> None:
    assert find_skipped(tmp_path) is None
    (tmp_path / "skipped.txt").write_text("/a\tx\n")
    assert find_skipped(tmp_path) == tmp_path / "skipped.txt"
    write_skipped(tmp_path / "skipped.csv", skipped_rows("pretrain", [("/a", "x")]))
    assert find_skipped(tmp_path) == tmp_path / "skipped.csv"


def test_unknown_skipped_layout_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "skipped.csv").write_text("a,b,c,d,e\n1,2,3,4,5\n")
    with pytest.raises(ValueError, match="skipped.csv"):
        read_skipped(tmp_path / "skipped.csv")


def test_config_yaml_and_a_resume_that_says_what_differs(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    cfg = {"optim": {"base_lr": 1e-3, "scale": (0.4, 1.0)}, "data": {"num_workers": 2}, "out": tmp_path}
    write_run_config(f, cfg)
    assert read_run_config(f) == {"optim": {"base_lr": 1e-3, "scale": [0.4, 1.0]}, "data": {"num_workers": 2},
                                  "out": str(tmp_path)}
    check_run_config(f, cfg)  # the same settings (a tuple given, a list read back): resumes
    check_run_config(f, {**cfg, "data": {"num_workers": 8}}, ignore=("data.num_workers",))
    check_run_config(tmp_path / "none.yaml", {"x": 1})  # nothing stored: nothing to compare
    with pytest.raises(ConfigError) as e:
        check_run_config(f, {**cfg, "optim": {"base_lr": 0.1, "scale": (0.4, 1.0)}, "new": 1})
    msg = str(e.value)
    assert str(f) in msg and "optim.base_lr: 0.001 (in the folder) != 0.1 (this run)" in msg
    assert "new: None (in the folder) != 1" in msg and "scale" not in msg and "num_workers" not in msg


def test_overrides_are_yaml_with_numbers_and_unknown_keys_listed() -> None:
    assert parse_override("optim.base_lr=1e-3") == ("optim.base_lr", 1e-3)
    assert parse_override("a=[0.4, 1.0]") == ("a", [0.4, 1.0]) and parse_override("a=null") == ("a", None)
    assert parse_override("a=png") == ("a", "png") and parse_override("a=16") == ("a", 16)
    schema = {"optim": {"base_lr": 0.1, "wd": 0.0}, "student": {"overrides": {}}}
    cfg = {"optim": {"base_lr": 0.1, "wd": 0.0}, "student": {"overrides": {}}}
    apply_overrides(cfg, ["optim.wd=1e-2", "student.overrides.depth=2"], schema)
    assert cfg == {"optim": {"base_lr": 0.1, "wd": 0.01}, "student": {"overrides": {"depth": 2}}}
    with pytest.raises(ConfigError, match=r"'optim.base_lrr'; known keys under 'optim': base_lr, wd"):
        apply_overrides(cfg, ["optim.base_lrr=1"], schema)
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(cfg, ["optim.base_lr"], schema)
    free: dict = {"dedup": {"embedding": None}}
    apply_overrides(free, ["dedup.embedding.threshold=0.9"])  # no schema: mappings are made on the way
    assert free == {"dedup": {"embedding": {"threshold": 0.9}}}


def test_data_root_is_the_environment_else_shared_data_beside_the_checkout(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    monkeypatch.setenv("CHEXFOUND_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.delenv("CHEXFOUND_DATA")
    checkout = Path(__file__).resolve().parents[2]
    assert data_root() == checkout.parent / "shared" / "data"
