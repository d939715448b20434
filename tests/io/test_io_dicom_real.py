"""Every real DICOM in shared/data/dicom reads correctly: header facts, orientation of grey levels, codecs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from chexfound.io import read_image


def _manifest(data_root: Path) -> dict[str, dict[str, str]]:
    with open(data_root / "dicom" / "manifest.csv", newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


def _dicom_files(data_root: Path) -> list[Path]:
    files = sorted((data_root / "dicom").glob("*.dcm"))
    assert len(files) == 7, files
    return files


@pytest.fixture(scope="module")
def images(data_root: Path) -> dict[str, object]:
    return {p.name: read_image(p) for p in _dicom_files(data_root)}


def lung_vs_mediastinum(pixels: np.ndarray) -> tuple[float, float, float]:
    """Median grey level of the central vertical strip (mediastinum + spine) and of the two lateral lung
    fields, over the rows between the apices and the diaphragm (25-60% of the height). Medians make the
    check robust to tubes, markers and text burnt into a corner."""
    h, w = pixels.shape
    rows = slice(int(0.25 * h), int(0.60 * h))
    centre = float(np.median(pixels[rows, int(0.45 * w) : int(0.55 * w)]))
    left = float(np.median(pixels[rows, int(0.18 * w) : int(0.33 * w)]))
    right = float(np.median(pixels[rows, int(0.67 * w) : int(0.82 * w)]))
    return centre, left, right


def test_every_file_matches_its_manifest_facts(data_root: Path, images: dict) -> None:
    facts = _manifest(data_root)
    assert set(facts) == set(images)
    for name, img in images.items():
        row, meta = facts[name], img.meta
        assert img.pixels.dtype == np.float32 and img.pixels.ndim == 2
        assert 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0 and img.pixels.std() > 0.05, name
        assert list(img.shape) == [int(row["rows"]), int(row["cols"])], name
        assert meta["source_format"] == "DICOM"
        assert meta["original_size"] == [int(row["rows"]), int(row["cols"])]
        assert meta["photometric_interpretation"] == row["photometric"], name
        assert meta["bit_depth"] == int(row["bits_stored"]), name
        assert meta["bits_allocated"] == int(row["bits_allocated"]), name
        assert meta["modality"] == row["modality"], name
        assert (meta["view_position"] or "") == row["view"], name
        assert meta["has_file_meta"] == (row["has_preamble"] == "True"), name
        if row["transfer_syntax"].startswith("1.2"):
            assert meta["transfer_syntax"] == row["transfer_syntax"], name
        if row["window"] != "/":
            centre, width = (float(v) for v in row["window"].split("/"))
            assert meta["voi"] == "window" and meta["window"] == [centre, width], name
        else:
            assert meta["voi"] is None, name
        assert meta["inverted"] == (row["photometric"] == "MONOCHROME1"), name
        assert meta["stored_range"] == [float(row["pix_min"]), float(row["pix_max"])], name


def test_lungs_darker_than_mediastinum(images: dict) -> None:
    for name, img in images.items():
        centre, left, right = lung_vs_mediastinum(img.pixels)
        if name == "Fake_MONOHR1.dcm":
            # MONOCHROME1 header over MONOCHROME2 pixels: obeying the header shows it inverted.
            assert centre < left - 0.1 and centre < right - 0.1, (name, centre, left, right)
        else:
            assert centre > left + 0.1 and centre > right + 0.1, (name, centre, left, right)


def test_j2k_lossless_equals_uncompressed(images: dict, data_root: Path) -> None:
    a, b = images["RG1_J2KR.dcm"].pixels, images["RG1_UNCR.dcm"].pixels
    assert np.array_equal(a, b)
    # and the raw stored values too, without any VOI
    ra = read_image(data_root / "dicom" / "RG1_J2KR.dcm", apply_voi=False).pixels
    rb = read_image(data_root / "dicom" / "RG1_UNCR.dcm", apply_voi=False).pixels
    assert np.array_equal(ra, rb)


def test_j2k_lossy_is_close_to_uncompressed(images: dict) -> None:
    a, b = images["RG1_J2KI.dcm"].pixels, images["RG1_UNCR.dcm"].pixels
    assert not np.array_equal(a, b)  # it is lossy...
    assert float(np.abs(a - b).mean()) < 0.01  # ...but the same image
    assert np.corrcoef(a.ravel()[::7], b.ravel()[::7])[0, 1] > 0.99


def test_fake_monochrome1_is_exact_inverse_of_siim(images: dict) -> None:
    siim = next(v for k, v in images.items() if k.startswith("siim_"))
    fake = images["Fake_MONOHR1.dcm"]
    assert np.array_equal(fake.pixels, (1.0 - siim.pixels).astype(np.float32))
    assert fake.meta["patient_id"] == siim.meta["patient_id"]


def test_acr_nema_file_without_preamble(data_root: Path) -> None:
    p = data_root / "dicom" / "CR-MONO1-10-chest.dcm"
    assert p.read_bytes()[128:132] != b"DICM"
    img = read_image(p)
    assert img.meta["has_file_meta"] is False
    assert img.meta["transfer_syntax_name"] == "Implicit VR Little Endian"
    # window 550/1024 over 10-bit data, then MONOCHROME1 inversion: the raw max (979) is darkest
    raw = read_image(p, apply_voi=False)
    assert raw.pixels.min() == 0.0 and raw.pixels.max() == 1.0


def test_metadata_ids_and_spacing(images: dict) -> None:
    siim = next(v for k, v in images.items() if k.startswith("siim_"))
    assert siim.meta["pixel_spacing"] == [0.168, 0.168]
    assert images["RG1_UNCR.dcm"].meta["pixel_spacing"] is None  # header says 0.000: unknown
    assert images["RG1_UNCR.dcm"].meta["patient_id"] == "9RG1"
    assert images["RG1_UNCR.dcm"].meta["study_id"]
    assert images["nih_gcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"].meta[
        "transfer_syntax_name"] == "Implicit VR Little Endian"
