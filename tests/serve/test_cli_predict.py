"""`chexfound predict`: folders, DICOM, manifests -> CSV/JSON; heatmaps; resume; bad files skipped."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chexfound.cli.main import main
from chexfound.data.findings import NIH14
from chexfound.serve import Predictor
from chexfound.serve.results import heatmap_folder


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def predict(models: dict[str, Path], *args: str, head: str = "linear") -> int:
    return main(["predict", "--backbone", str(models["backbone"]), "--head", str(models[head]), "--quiet",
                 "--batch-size", "2", *args])


def test_csv_for_folder_and_dicom(models: dict[str, Path], data_root: Path, dicom_paths: list[Path],
                                  tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    folder = data_root / "nih14-fullres"
    assert predict(models, "--out", str(out), str(folder), str(dicom_paths[0])) == 0
    header, rows = read_csv(out)
    assert header == ["path", *NIH14]  # named as the head names them
    pngs = sorted(str(p) for p in (folder / "images").glob("*.png"))
    assert sorted(r[0] for r in rows[:-1]) == pngs and rows[-1][0] == str(dicom_paths[0])
    ref = Predictor(models["backbone"], models["linear"], device="cpu").predict_image(pngs[0]).probabilities
    got = next(r for r in rows if r[0] == pngs[0])
    np.testing.assert_allclose([float(v) for v in got[1:]], ref, atol=1e-5)
    run = json.loads(out.with_name("preds.run.json").read_text())
    assert run["status"] == "complete" and run["predicted"] == len(rows) and run["skipped"] == 0
    assert not out.with_name("preds.skipped.csv").exists()
    assert not list(tmp_path.glob(".preds.csv*"))  # no partial or temp files left behind


def test_json_calls_and_heatmaps(models: dict[str, Path], png_paths: list[Path], tmp_path: Path) -> None:
    out, heat = tmp_path / "preds.json", tmp_path / "heat"
    assert predict(models, "--out", str(out), "--heatmaps", str(heat), "--top-k", "2", *map(str, png_paths[:2]),
                   head="attention") == 0
    doc = json.loads(out.read_text())
    assert doc["model"]["findings"] == list(NIH14) and doc["skipped"] == []
    assert [p["path"] for p in doc["predictions"]] == [str(p) for p in png_paths[:2]]
    for rec in doc["predictions"]:
        probs = {f["name"]: f["probability"] for f in rec["findings"]}
        assert rec["positive"] == [f["name"] for f in rec["findings"] if f["probability"] >= f["threshold"]]
        top2 = sorted(probs, key=lambda n: -probs[n])[:2]
        assert sorted(rec["heatmaps"]) == sorted(top2)
        for name, file in rec["heatmaps"].items():
            assert Path(file).parent.name == heatmap_folder(rec["path"])
            im = Image.open(file)
            assert im.size == (512, 512) and im.mode == "RGB"


def test_heatmaps_need_an_attention_head(models: dict[str, Path], png_paths: list[Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc = predict(models, "--out", str(tmp_path / "p.csv"), "--heatmaps", str(tmp_path / "h"), str(png_paths[0]))
    assert rc == 2
    assert "no attention maps" in capsys.readouterr().err


def test_bad_files_listed_and_skipped(models: dict[str, Path], png_paths: list[Path], not_an_image: Path,
                                      tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    args = ["--out", str(out), str(png_paths[0]), str(not_an_image), str(tmp_path / "gone.png")]
    assert predict(models, *args) == 0
    _, rows = read_csv(out)
    assert [r[0] for r in rows] == [str(png_paths[0])]
    _, skipped = read_csv(out.with_name("preds.skipped.csv"))
    assert [r[0] for r in skipped] == [str(not_an_image), str(tmp_path / "gone.png")]
    assert "not a readable image" in skipped[0][1] and "no such file" in skipped[1][1]
    assert predict(models, "--strict", *args) == 1  # --strict: skipped files make the run fail


def test_resume_skips_done_rows_and_appends(models: dict[str, Path], png_paths: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    # An interrupted run left one finished row (with a marker value no model would give) and a torn row.
    partial = tmp_path / ".preds.csv.partial"
    marker = ["0.123"] * len(NIH14)
    partial.write_text(",".join(["path", *NIH14]) + "\n" + ",".join([str(png_paths[0]), *marker]) + "\n"
                       + str(png_paths[1]) + ",0.5,0.5\n")
    assert predict(models, "--out", str(out), *map(str, png_paths[:2])) == 0
    _, rows = read_csv(out)
    assert [r[0] for r in rows] == [str(p) for p in png_paths[:2]]
    assert rows[0][1:] == marker  # done before: not recomputed
    assert rows[1][1:] != ["0.5", "0.5"] and len(rows[1]) == len(NIH14) + 1  # torn row: redone
    assert not partial.exists()
    # A second run with one more image keeps the earlier rows and adds only the new one.
    assert predict(models, "--out", str(out), *map(str, png_paths)) == 0
    _, rows2 = read_csv(out)
    assert rows2[:2] == rows and rows2[2][0] == str(png_paths[2])
    run = json.loads(out.with_name("preds.run.json").read_text())
    assert run["resumed"] == 2 and run["predicted"] == 3


def test_resume_refuses_another_model(models: dict[str, Path], png_paths: list[Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "preds.csv"
    assert predict(models, "--out", str(out), str(png_paths[0])) == 0
    rc = main(["predict", "--backbone", str(models["other_backbone"]), "--head", str(models["linear"]), "--quiet",
               "--out", str(out), str(png_paths[1])])
    assert rc == 2 and "different model" in capsys.readouterr().err


def test_manifest_input(models: dict[str, Path], data_root: Path, tmp_path: Path) -> None:
    manifest = data_root / "nih14-fullres" / "labels.csv"
    out = tmp_path / "m.csv"
    assert predict(models, "--manifest", str(manifest), "--out", str(out)) == 0
    _, rows = read_csv(out)
    import pandas as pd

    expected = [str(manifest.parent / p) for p in pd.read_csv(manifest)["path"]]
    assert [r[0] for r in rows] == expected


def test_needs_inputs(models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert predict(models) == 2
    assert "give image files" in capsys.readouterr().err
