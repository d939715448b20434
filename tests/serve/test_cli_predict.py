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
from chexfound.runio import read_skipped
from chexfound.serve import Predictor
from chexfound.serve.results import heatmap_folder


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def predict(models: dict[str, Path], *args: str, head: str = "linear") -> int:
    return main(["predict", "--backbone", str(models["backbone"]), "--head", str(models[head]), "--quiet",
                 "--batch-size", "2", *args])


def test_csv_for_nested_folder_with_dicom(models: dict[str, Path], png_paths: list[Path], dicom_paths: list[Path],
                                          tmp_path: Path) -> None:
    # A study folder as exported from a PACS: nested series, a DICOM without extension, non-image files.
    study = tmp_path / "study"
    (study / "series1").mkdir(parents=True)
    (study / "series2" / ".cache").mkdir(parents=True)
    (study / "series1" / "a.png").symlink_to(png_paths[0])
    (study / "series2" / "b.PNG").symlink_to(png_paths[1])
    (study / "series2" / "IM0001").symlink_to(dicom_paths[0])  # Part-10 DICOM, recognised by its 'DICM'
    (study / "series2" / ".cache" / "c.png").symlink_to(png_paths[2])  # hidden: ignored
    (study / "notes.txt").write_text("not an image")
    (study / "series1" / "manifest.csv").write_text("path\n")
    out = tmp_path / "preds.csv"
    assert predict(models, "--out", str(out), str(study), str(png_paths[2])) == 0
    header, rows = read_csv(out)
    assert header == ["path", *NIH14]  # named as the head names them
    expected = [study / "series1" / "a.png", study / "series2" / "IM0001", study / "series2" / "b.PNG", png_paths[2]]
    assert [r[0] for r in rows] == [str(p) for p in expected]
    ref = Predictor(models["backbone"], models["linear"], device="cpu").predict(expected)
    for row, pred in zip(rows, ref):
        np.testing.assert_allclose([float(v) for v in row[1:]], pred.probabilities, atol=1e-5)
    run = json.loads(out.with_name("preds.run.json").read_text())
    assert run["status"] == "complete" and run["predicted"] == len(rows) and run["skipped"] == 0
    assert run["identity"]["findings"] == list(NIH14)
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
        # The same per-finding threshold record as /v1/predict and Prediction.findings_list.
        assert all(f["threshold_rule"] and f["threshold_reason"] for f in rec["findings"])
        top2 = sorted(probs, key=lambda n: -probs[n])[:2]
        assert sorted(rec["heatmaps"]) == sorted(top2)
        for name, file in rec["heatmaps"].items():
            assert Path(file).parent.name == heatmap_folder(rec["path"])
            assert Path(file).name.startswith(Path(rec["path"]).stem)
            im = np.asarray(Image.open(file).convert("RGB")).astype(int)
            assert im.shape[1] == 512  # the 64-px model's view drawn at 512 px (+ a title band)
            colour = np.abs(im[..., 0] - im[..., 2]) + np.abs(im[..., 1] - im[..., 2])
            assert (colour > 40).mean() > 0.05  # a coloured map over the grayscale image


def test_every_head_has_heatmaps_that_say_their_kind(models: dict[str, Path], png_paths: list[Path],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    rc = predict(models, "--out", str(out), "--heatmaps", str(tmp_path / "h"), "--top-k", "1", str(png_paths[0]))
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["model"]["head"]["heatmap_kind"] == "linear_patch_contribution"
    (rec,) = doc["predictions"]
    assert rec["heatmap_kind"] == "linear_patch_contribution" and len(rec["heatmaps"]) == 1
    assert all(Path(f).is_file() for f in rec["heatmaps"].values())
    run = json.loads(out.with_name("p.run.json").read_text())
    assert run["model"]["head"]["heatmap_kind"] == "linear_patch_contribution"  # beside a CSV too


def test_bad_files_listed_and_skipped(models: dict[str, Path], png_paths: list[Path], not_an_image: Path,
                                      tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    args = ["--out", str(out), str(png_paths[0]), str(not_an_image), str(tmp_path / "gone.png")]
    assert predict(models, *args) == 0
    _, rows = read_csv(out)
    assert [r[0] for r in rows] == [str(png_paths[0])]
    skipped = [(s.path, s.reason) for s in read_skipped(out.with_name("preds.skipped.csv"))]
    assert [r[0] for r in skipped] == [str(not_an_image), str(tmp_path / "gone.png")]
    assert "not a recognised image format" in skipped[0][1] and "no such file" in skipped[1][1]
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
               "--allow-backbone-mismatch", "--out", str(out), str(png_paths[1])])
    assert rc == 2 and "different model" in capsys.readouterr().err


def test_head_from_another_backbone_needs_the_flag(models: dict[str, Path], png_paths: list[Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "preds.csv"
    base = ["predict", "--backbone", str(models["other_backbone"]), "--head", str(models["linear"]), "--quiet",
            "--out", str(out), str(png_paths[0])]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "linear.safetensors" in err and "trained on backbone" in err and "--allow-backbone-mismatch" in err
    assert not out.exists()
    with pytest.warns(UserWarning, match="trained on backbone"):
        assert main(base + ["--allow-backbone-mismatch"]) == 0
    assert out.is_file()
    for verb in (["export", "--format", "safetensors", "--out", str(tmp_path / "b.safetensors")],
                 ["serve", "--port", "1"]):
        args = [verb[0], "--backbone", str(models["other_backbone"]), "--head", str(models["linear"]), *verb[1:]]
        assert main(args) == 2 and "trained on backbone" in capsys.readouterr().err


def test_manifest_input(models: dict[str, Path], png_paths: list[Path], tmp_path: Path) -> None:
    # Relative rows resolve against the manifest's folder, as in the shared data sets; only `path` is needed.
    (tmp_path / "data").symlink_to(png_paths[0].parent)
    manifest = tmp_path / "m.csv"
    rel = [f"data/{p.name}" for p in png_paths[:2]]
    manifest.write_text("path,patient_id\n" + "".join(f"{r},{i}\n" for i, r in enumerate(rel)))
    out = tmp_path / "out"  # a folder: predictions.csv goes inside
    out.mkdir()
    assert predict(models, "--manifest", str(manifest), "--out", str(out)) == 0
    _, rows = read_csv(out / "predictions.csv")
    assert [r[0] for r in rows] == [str(tmp_path / r) for r in rel]


def test_needs_inputs(models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert predict(models) == 2
    assert "give image files" in capsys.readouterr().err


def test_exit_status_when_no_input_could_be_read(models: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Every input unreadable is a failure (exit 1) even without --strict, and --help says so."""
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    assert predict(models, "--out", str(tmp_path / "p.csv"), str(bad)) == 1
    assert "no image could be read from 1 input(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "1 when no input at all could be read" in " ".join(capsys.readouterr().out.split())
