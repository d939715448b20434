"""`chexfound manifest`, run in-process on the shared NIH and Kermany folders."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from chexfound.cli.main import main
from chexfound.data.findings import NIH14
from chexfound.data.manifest import read_manifest


def test_manifest_nih14_shared(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nih.csv"
    rc = main(["manifest", "--format", "nih14-shared", "--root", str(data_root / "nih14"), "--out", str(out),
               "--split-seed", "7", "--split-fractions", "0.8,0.1,0.1"])
    assert rc == 0
    assert "550 images, 444 patients, 14 label column(s)" in capsys.readouterr().out
    m = read_manifest(out)
    assert m.label_columns == list(NIH14) and all(p.is_file() for p in m.paths())
    assert set(m.df["split"]) == {"train", "val", "test"}
    assert (m.df.groupby("patient_id")["split"].nunique() == 1).all()


def test_manifest_kermany_parquet_and_folder(data_root: Path, tmp_path: Path) -> None:
    assert main(["manifest", "--format", "kermany", "--root", str(data_root / "kermany"),
                 "--out", str(tmp_path / "k.parquet"), "--quiet"]) == 0
    k = read_manifest(tmp_path / "k.parquet")
    assert len(k) == 5840 and k.label_columns == ["PNEUMONIA"]
    assert k.df["split"].value_counts().to_dict() == {"train": 5216, "test": 624}
    assert k.paths()[0].is_file()
    assert main(["manifest", "--format", "folder", "--root", str(data_root / "kermany" / "dataset"),
                 "--out", str(tmp_path / "f.csv"), "--split-within", "train", "--split-fractions", "0.9,0.1",
                 "--split-names", "train,val", "--quiet"]) == 0
    f = pd.read_csv(tmp_path / "f.csv")
    assert set(f["split"]) == {"train", "val", "test"} and (f["split"] == "test").sum() == 624


def test_manifest_user_errors(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["manifest", "--root", str(data_root / "nih14"), "--out", str(tmp_path / "x.csv")]
    assert main([*args, "--format", "nih14"]) == 2
    assert "nih14-shared" in capsys.readouterr().err
    assert main([*args, "--format", "nih14-shared", "--vote", "any"]) == 2
    assert "--vote does not apply" in capsys.readouterr().err
    assert main([*args, "--format", "nih14-shared", "--split-fractions", "0.5,0.5"]) == 2
    assert "2 split fractions but 3 names" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
