"""`predict` names a file whose photometric header its pixels contradict (once, with the file)."""

from __future__ import annotations

import logging
from pathlib import Path

from chexfound.cli.main import main


def test_predict_warns_about_the_fake_monochrome1_file(models: dict[str, Path], data_root: Path, tmp_path: Path,
                                                       caplog) -> None:
    fake, good = data_root / "dicom" / "Fake_MONOHR1.dcm", data_root / "dicom" / "CR-MONO1-10-chest.dcm"
    with caplog.at_level(logging.WARNING):
        assert main(["predict", "--backbone", str(models["backbone"]), "--head", str(models["linear"]),
                     str(fake), str(good), "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0
    said = [r.getMessage() for r in caplog.records if "MONOCHROME1" in r.getMessage()]
    assert len(said) == 1 and str(fake) in said[0]
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 3  # both predicted: a warning, not a skip
