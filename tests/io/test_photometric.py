"""A MONOCHROME1 header over pixels stored the other way round: read as the header says, with a warning."""

from __future__ import annotations

import numpy as np

from chexfound.cli.main import main
from chexfound.io import read_image
from chexfound.io.photometric import INVERTED_CONTRAST, looks_inverted, mediastinum_contrast


def test_the_fake_monochrome1_file_is_read_as_its_header_says_with_a_warning(data_root, capsys):
    fake = read_image(data_root / "dicom" / "Fake_MONOHR1.dcm")
    assert fake.meta["photometric_interpretation"] == "MONOCHROME1" and fake.meta["inverted"]  # as the header says
    (w,) = fake.meta["warnings"]
    assert "MONOCHROME1" in w and "negative" in w
    assert mediastinum_contrast(fake.pixels) < INVERTED_CONTRAST
    # Correct files, MONOCHROME1 or 2, DICOM or PNG: no warning.
    for p in ["CR-MONO1-10-chest.dcm", "RG1_UNCR.dcm", "RG1_J2KR.dcm"]:
        img = read_image(data_root / "dicom" / p)
        assert "warnings" not in img.meta and not looks_inverted(img.pixels), p
    for p in sorted((data_root / "nih14" / "images").glob("*.png"))[:20]:
        assert not looks_inverted(read_image(p).pixels), p
    # The check sees the negative of a correct image as inverted.
    good = read_image(data_root / "dicom" / "CR-MONO1-10-chest.dcm").pixels
    assert looks_inverted(1.0 - good) and not looks_inverted(np.zeros((4, 4)))

    assert main(["info", str(data_root / "dicom" / "Fake_MONOHR1.dcm"),
                 str(data_root / "dicom" / "CR-MONO1-10-chest.dcm")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "Fake_MONOHR1.dcm" in err and "MONOCHROME1" in err
