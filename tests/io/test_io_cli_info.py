"""`chexfound info`, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chexfound.cli.main import main


def test_info_reads_all_seven_dicoms(data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in (data_root / "dicom").glob("*.dcm"))
    assert main(["info", "--strict", *files]) == 0
    out = capsys.readouterr().out
    assert "7 of 7 file(s) read" in out
    assert "no file meta" in out and "JPEG 2000" in out and "MONOCHROME1 (inverted)" in out
    assert "window 15000/30000" in out and "spacing 0.168x0.168 mm" in out and "patient 9RG1" in out


def test_info_json_preview_and_bad_files(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "empty.dcm"
    bad.write_bytes(b"")
    good = data_root / "dicom" / "CR-MONO1-10-chest.dcm"
    prev = tmp_path / "prev"
    rc = main(["info", "--json", "--preview", str(prev), "--preview-size", "128", str(good), str(bad)])
    assert rc == 0  # not strict: bad files are listed, not fatal
    doc = json.loads(capsys.readouterr().out)
    assert doc["read"] == 1 and doc["failed"] == 1
    ok, err = doc["files"]
    assert ok["meta"]["photometric_interpretation"] == "MONOCHROME1" and ok["shape"] == [440, 440]
    assert err == {"path": str(bad), "ok": False, "error": "empty file"}
    png = np.asarray(Image.open(ok["preview"]))
    assert png.shape == (128, 128) and png.dtype == np.uint8
    h = png.shape[0]
    assert png[h // 3 : 2 * h // 3, 60:68].mean() > png[h // 3 : 2 * h // 3, 20:40].mean()  # lungs dark
    assert (prev / "skipped.csv").read_text().splitlines()[1].endswith("empty file")
    assert main(["info", "--strict", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "1 of 2 file(s) read, 1 could not be read:" in out and f"{bad}: empty file" in out


def test_info_scans_folders(data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--quiet", str(data_root / "nih14-fullres" / "images")]) == 0
    assert "21 of 21 file(s) read" in capsys.readouterr().out
