"""Every command follows the run-folder contract: one override spelling (`--set`, pretrain's positional form an
alias), one parser (curate reads `1e-3` as a number and lists the keys it knows), one data-folder default."""

from __future__ import annotations

from pathlib import Path

import pytest

from chexfound.cli.main import main
from chexfound.curate.spec import load_spec
from chexfound.errors import ConfigError
from chexfound.runio import data_root


def test_pretrain_set_and_the_positional_alias(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--config", "vits16_cpu_smoke", "--print-config", "--set", "optim.base_lr=1e-3",
                 "ibot.loss_weight=0"]) == 0
    out = capsys.readouterr().out
    assert "base_lr: 0.001" in out and "loss_weight: 0" in out
    assert main(["pretrain", "--config", "vits16_cpu_smoke", "--print-config", "--set", "optim.base_lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "'optim.base_lrr'; known keys under 'optim'" in err and "base_lr," in err


def test_curate_overrides_use_the_same_parser(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("sources:\n  - {name: a, root: /x}\n")
    spec = load_spec(p, ["dedup.embedding.backbone=vits16_224", "dedup.embedding.threshold=95e-2"])
    assert spec.dedup.embedding is not None and spec.dedup.embedding.threshold == 0.95  # a number, not "95e-2"
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\]; allowed: .*'views'"):
        load_spec(p, ["filters.colour=red"])
    with pytest.raises(ConfigError, match="allowed: .*'dedup'"):
        load_spec(p, ["dedupe.exact=false"])


def test_demo_data_default_is_the_one_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("CHEXFOUND_DATA", str(empty))
    assert data_root() == empty
    assert main(["demo", "--out", str(tmp_path / "o")]) == 2  # the demo looked where data_root() points
    assert f"{empty}: expected the shared data folder" in capsys.readouterr().err


def test_pretraining_lists_skipped_images_in_skipped_csv(tmp_path: Path) -> None:
    from chexfound.runio import read_skipped
    from chexfound.ssl.data import Skipped

    s = Skipped()
    s.add([(3, "/a.png", "empty file")])
    run = tmp_path / "run.v2"
    run.mkdir()
    assert s.write(run) == run / "skipped.csv"
    assert s.write(run / "skipped.txt") == run / "skipped.csv"  # an older caller's file name: the same list
    assert not (run / "skipped.txt").exists()
    assert [(r.stage, r.path, r.reason) for r in read_skipped(run / "skipped.csv")] == [
        ("pretrain", "/a.png", "empty file")]
