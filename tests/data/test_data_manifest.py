"""Manifests: CSV/Parquet round trips, path rebasing, label policies, patient-level splits, bad input;
datasets over them."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from chexfound.data.datasets import ImageDataset, collate_skip_errors, manifest_dataset
from chexfound.data.manifest import Manifest, patient_split, read_manifest
from chexfound.data.readers import read_nih14_shared
from chexfound.data.transform import InputTransform
from chexfound.errors import ManifestError
from chexfound.io import read_image


@pytest.fixture(scope="module")
def nih(data_root: Path) -> Manifest:
    return read_nih14_shared(data_root / "nih14")


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".csv.gz"])
def test_roundtrip_keeps_images_and_labels(nih: Manifest, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / "sub" / f"m{suffix}"
    nih.save(out)
    back = read_manifest(out)
    assert back.paths() == nih.paths()  # rebased: same files from the new folder
    assert back.label_columns == nih.label_columns
    np.testing.assert_array_equal(back.labels(), nih.labels())
    assert back.df["patient_id"].tolist() == nih.df["patient_id"].astype(str).tolist()


def test_relative_paths_under_the_manifest_folder(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    m = Manifest(pd.DataFrame({"path": ["imgs/a.png"], "patient_id": ["1"], "X": [1.0]}), tmp_path, ["X"])
    m.save(tmp_path / "m.csv")
    assert pd.read_csv(tmp_path / "m.csv")["path"].tolist() == ["imgs/a.png"]
    m.save(tmp_path / "elsewhere" / "deep" / "m.csv")
    assert pd.read_csv(tmp_path / "elsewhere" / "deep" / "m.csv")["path"].tolist() == [str(tmp_path / "imgs/a.png")]


def test_paths_are_never_resolved_through_symlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data folder reached through a symlink keeps the link's name: relative paths stay relative to the
    manifest (through the link), absolute ones stay as given; reading finds the same files."""
    real = tmp_path / "store" / "imgs"
    real.mkdir(parents=True)
    (real / "a.png").write_bytes(b"x")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data").symlink_to(tmp_path / "store")
    monkeypatch.chdir(tmp_path / "work")
    rel = Manifest(pd.DataFrame({"path": ["imgs/a.png"], "patient_id": ["1"], "X": [1.0]}), Path("data"), ["X"])
    rel.save("runs/m.csv")
    assert pd.read_csv("runs/m.csv")["path"].tolist() == ["../data/imgs/a.png"]
    assert [p.is_file() for p in read_manifest("runs/m.csv").paths()] == [True]
    absolute = Manifest(rel.df, tmp_path / "work" / "data", ["X"])
    absolute.save(tmp_path / "other" / "m.csv")
    assert pd.read_csv(tmp_path / "other" / "m.csv")["path"].tolist() == [f"{tmp_path}/work/data/imgs/a.png"]
    assert read_manifest(tmp_path / "other" / "m.csv").paths()[0].is_file()


def test_uncertain_policies() -> None:
    df = pd.DataFrame({"path": list("abc"), "patient_id": list("123"), "A": [1, -1, None], "B": [-1, 0, 1]})
    m = Manifest(df, Path("."), ["A", "B"])
    assert np.isnan(m.labels()[1, 0]) and np.isnan(m.labels()[2, 0]) and np.isnan(m.labels()[0, 1])
    assert m.labels("zero")[1, 0] == 0 and m.labels("one")[0, 1] == 1
    both = m.labels({"A": "one"})
    assert both[1, 0] == 1 and np.isnan(both[0, 1])
    with pytest.raises(ValueError):
        m.labels({"C": "one"})
    with pytest.raises(ValueError):
        m.labels("maybe")  # type: ignore[arg-type]


def test_patient_split_no_leak_and_seeded(nih: Manifest) -> None:
    pats = nih.patients()
    s1 = patient_split(pats, (0.6, 0.2, 0.2), seed=3)
    s2 = patient_split(pats, (0.6, 0.2, 0.2), seed=3)
    s3 = patient_split(pats, (0.6, 0.2, 0.2), seed=4)
    assert np.array_equal(s1, s2) and not np.array_equal(s1, s3)
    per_patient = pd.Series(s1).groupby(pats).nunique()
    assert (per_patient == 1).all()  # no patient in two splits
    assert nih.df["patient_id"].duplicated().any()  # (the set does have repeat patients)
    n_pat = pd.Series(pats).groupby(s1).nunique()
    assert abs(n_pat["train"] / len(set(pats)) - 0.6) < 0.01
    with pytest.raises(ValueError):
        patient_split(pats, (0.5, 0.2), names=("a", "b"))


def test_split_within_keeps_other_rows(nih: Manifest) -> None:
    m = nih.with_patient_split((0.8, 0.2), ("train", "test"), seed=0)
    m2 = m.with_patient_split((0.9, 0.1), ("train", "val"), seed=1, within="train")
    assert (m2.df.loc[m.df["split"] == "test", "split"] == "test").all()
    assert set(m2.df["split"]) == {"train", "val", "test"}
    assert (m2.df.groupby("patient_id")["split"].nunique() == 1).all()
    assert len(m2.split("val")) > 0 and len(m2.split("val")) + len(m2.split("train")) == len(m.split("train"))


@pytest.mark.parametrize(
    "csv, match",
    [
        ("image,patient_id\na.png,1\n", "missing required column 'path'"),
        ("path,pid\na.png,1\n", "patient_id"),
        ("path,patient_id,A\na.png,1,1\nb.png,,0\n", "empty 'patient_id'"),
        ("path,patient_id,A\n\"\",1,1\n", "empty 'path'"),
    ],
)
def test_bad_manifests(tmp_path: Path, csv: str, match: str) -> None:
    (tmp_path / "m.csv").write_text(csv)
    with pytest.raises(ManifestError, match=match) as e:
        read_manifest(tmp_path / "m.csv")
    assert str(tmp_path / "m.csv") in str(e.value)


def test_bad_labels_and_paths(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path,patient_id,A\na.png,1,2\n")
    with pytest.raises(ManifestError, match="value 2"):
        read_manifest(tmp_path / "m.csv", labels=["A"])
    with pytest.raises(ManifestError, match=r"missing label column\(s\) \['B'\]"):
        read_manifest(tmp_path / "m.csv", labels=["B"])
    (tmp_path / "ok.csv").write_text("path,patient_id,A\na.png,1,1\n")
    with pytest.raises(ManifestError, match="1 path"):
        read_manifest(tmp_path / "ok.csv", check_paths=True)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ManifestError, match="cannot parse"):
        read_manifest(tmp_path / "bad.parquet")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "none.csv")


def test_manifest_dataset_batches_and_skips_bad(nih: Manifest, tmp_path: Path, data_root: Path) -> None:
    sub = nih.subset(np.arange(len(nih)) < 4)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    df = pd.concat([sub.df, sub.df.iloc[:1].assign(path=str(tmp_path / "broken.png"))], ignore_index=True)
    m = Manifest(df, sub.root, sub.label_columns)
    ds = manifest_dataset(m, InputTransform(size=64), uncertain="zero")
    batch = collate_skip_errors([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (4, 3, 64, 64) and batch["label"].shape == (4, 14)
    assert len(batch["errors"]) == 1 and batch["errors"][0][0] == 4 and "broken.png" in batch["errors"][0][2]
    strict = ImageDataset(m.paths()[:1], InputTransform(size=64), reader=partial(read_image, min_size=1024))
    assert "smaller than the minimum" in strict[0]["error"]
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate_skip_errors, num_workers=0)
    assert sum(len(b["index"]) for b in loader) == 4
