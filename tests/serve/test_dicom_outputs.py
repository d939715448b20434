"""`predict --dicom-out / --fhir-out` on the shared real DICOMs: SR and heatmap objects that dciodvfy passes,
that pydicom and highdicom read back with the CSV's probabilities, that reference their sources; non-DICOM
inputs, DICOMs without UIDs and interrupted runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from chexfound.runio import read_skipped
from chexfound.serve.dicom_out import SR_FILE
from chexfound.serve.dicom_sr import read_sr_findings
from chexfound.serve.results import heatmap_folder

from .test_cli_predict import predict, read_csv

DCIODVFY = shutil.which("dciodvfy")


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines for one file. Missing binary: skip, except in CI (.ci/run installs dicom3tools)."""
    if DCIODVFY is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian package dicom3tools) is not installed")
        pytest.skip("dciodvfy (dicom3tools) not installed")
    r = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


def text_values(ds: pydicom.Dataset) -> list[str]:
    """Every TEXT content item's value in an SR tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            out.append(str(item.TextValue))
        out += text_values(item)
    return out


@pytest.fixture(scope="module")
def shared_dicoms(data_root: Path) -> list[Path]:
    paths = sorted((data_root / "dicom").glob("*.dcm"))
    assert len(paths) >= 7, f"expected the shared DICOMs under {data_root / 'dicom'}"
    return paths


@pytest.fixture(scope="module")
def run(models: dict[str, Path], shared_dicoms: list[Path], png_paths: list[Path],
        tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One predict run over every shared DICOM and a PNG, with SR, heatmaps (top 2) and FHIR."""
    tmp = tmp_path_factory.mktemp("dicom-out")
    out, dcm, fhir = tmp / "preds.csv", tmp / "dicom", tmp / "fhir"
    inputs = [*map(str, shared_dicoms), str(png_paths[0])]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = predict(models, "--out", str(out), "--dicom-out", str(dcm), "--fhir-out", str(fhir), "--top-k", "2",
                     *inputs)
    assert rc == 0
    header, rows = read_csv(out)
    csv_probs = {r[0]: np.array([float(v) for v in r[1:]]) for r in rows}
    return {"out": out, "dicom": dcm, "fhir": fhir, "header": header, "probs": csv_probs, "stderr": err.getvalue()}


def test_sr_per_dicom_reads_back_the_csv_probabilities(run: dict, shared_dicoms: list[Path]) -> None:
    findings = run["header"][1:]
    for src in shared_dicoms:
        sr_path = run["dicom"] / heatmap_folder(str(src)) / SR_FILE
        assert sr_path.is_file(), f"no SR for {src}"
        ds = pydicom.dcmread(sr_path)
        source = pydicom.dcmread(src, stop_before_pixels=True, force=True)
        # In the source's study, in a new series, its own instance; the source image referenced.
        assert ds.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID not in (source.SeriesInstanceUID, source.StudyInstanceUID)
        assert ds.SOPInstanceUID != source.SOPInstanceUID
        ev = ds.CurrentRequestedProcedureEvidenceSequence[0]
        assert ev.StudyInstanceUID == source.StudyInstanceUID
        assert ev.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        assert ev.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        # Patient copied only where valid (the shared files carry a Patient's Age of "62": dropped).
        assert ds.PatientID == source.get("PatientID", "")
        assert "PatientAge" not in ds or len(ds.PatientAge) == 4
        # highdicom reads back one group per finding with the CSV's probability, the call and the threshold.
        back = read_sr_findings(ds)
        assert list(back) == findings
        csv = run["probs"][str(src)]
        np.testing.assert_allclose([back[n]["Probability"] for n in findings], csv, rtol=1e-6, atol=1e-7)
        for n in findings:
            assert back[n]["present"] == (back[n]["Probability"] >= back[n]["Decision threshold"])
        # The algorithm identification carries the weights' hash and the threshold rule, per finding.
        texts = text_values(ds)
        assert sum(t.startswith("backbone weights SHA-256: ") for t in texts) == len(findings)
        assert sum(t.startswith("threshold_rule: ") for t in texts) == len(findings)


def test_written_objects_pass_dciodvfy_although_their_sources_do_not(run: dict, shared_dicoms: list[Path]) -> None:
    assert any(dciodvfy_errors(src) for src in shared_dicoms)  # the sources are not clean
    written = sorted(run["dicom"].rglob("*.dcm"))
    assert len(written) == len(shared_dicoms) * 3  # an SR and two heatmaps each
    for f in written:
        assert dciodvfy_errors(f) == [], f


def test_heatmap_secondary_captures(run: dict, shared_dicoms: list[Path]) -> None:
    for src in shared_dicoms:
        source = pydicom.dcmread(src, stop_before_pixels=True, force=True)
        scs = sorted((run["dicom"] / heatmap_folder(str(src))).glob("heatmap-*.dcm"))
        assert len(scs) == 2
        for f in scs:
            sc = pydicom.dcmread(f)
            assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
            assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.SeriesInstanceUID != source.SeriesInstanceUID
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert sc.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSIS" in sc.ImageComments
            assert "linear_patch_contribution" in sc.DerivationDescription
            rgb = sc.pixel_array
            assert rgb.ndim == 3 and rgb.shape[2] == 3
            colour = np.abs(rgb[..., 0].astype(int) - rgb[..., 2]).mean()
            assert colour > 5  # the map is burned in, not a plain grayscale copy


def test_two_inputs_with_one_uid_keep_their_own_outputs(run: dict, shared_dicoms: list[Path]) -> None:
    by_uid: dict[str, list[Path]] = {}
    for src in shared_dicoms:
        by_uid.setdefault(str(pydicom.dcmread(src, stop_before_pixels=True, force=True).SOPInstanceUID), []).append(src)
    twins = [v for v in by_uid.values() if len(v) > 1]
    assert twins, "the shared data has two files with one SOP Instance UID"
    a, b = twins[0][:2]
    sr_a = pydicom.dcmread(run["dicom"] / heatmap_folder(str(a)) / SR_FILE)
    sr_b = pydicom.dcmread(run["dicom"] / heatmap_folder(str(b)) / SR_FILE)
    assert sr_a.SOPInstanceUID != sr_b.SOPInstanceUID
    np.testing.assert_allclose(read_sr_findings(sr_a)["Atelectasis"]["Probability"], run["probs"][str(a)][0], rtol=1e-6)
    np.testing.assert_allclose(read_sr_findings(sr_b)["Atelectasis"]["Probability"], run["probs"][str(b)][0], rtol=1e-6)


def test_png_gets_no_sr_said_once(run: dict, png_paths: list[Path]) -> None:
    png = str(png_paths[0])
    assert png in run["probs"]  # predicted as usual
    lines = [ln for ln in run["stderr"].splitlines() if ln.startswith("no DICOM SR for")]
    said = f"no DICOM SR for {png}: a PNG file, not DICOM (no study to attach it to)"
    assert [ln for ln in lines if png in ln] == [said]
    assert not (run["dicom"] / heatmap_folder(png)).exists()


def test_fhir_reports_validate_and_match_the_csv(run: dict, shared_dicoms: list[Path], png_paths: list[Path]) -> None:
    from fhir.resources.bundle import Bundle
    from fhir.resources.device import Device
    from fhir.resources.diagnosticreport import DiagnosticReport
    from fhir.resources.observation import Observation

    models = {"DiagnosticReport": DiagnosticReport, "Observation": Observation, "Device": Device}
    findings = run["header"][1:]
    for src in [*shared_dicoms, png_paths[0]]:
        doc = json.loads((run["fhir"] / f"{heatmap_folder(str(src))}.fhir.json").read_text())
        Bundle.model_validate(doc)
        resources = [models[e["resource"]["resourceType"]].model_validate(e["resource"]) for e in doc["entry"]]
        report, *obs, device = resources
        assert isinstance(report, DiagnosticReport) and isinstance(device, Device)
        assert [o.code.text for o in obs] == findings
        np.testing.assert_allclose([float(o.valueQuantity.value) for o in obs], run["probs"][str(src)], rtol=1e-6)
        dev_url = doc["entry"][-1]["fullUrl"]
        assert all(o.device.reference == dev_url for o in obs)
        assert [r.reference for r in report.result] == [e["fullUrl"] for e in doc["entry"][1:-1]]
        for o in obs:
            threshold = next(c for c in o.component if c.code.coding[0].code == "threshold").valueQuantity.value
            call = o.interpretation[0].coding[0].code
            assert call == ("POS" if float(o.valueQuantity.value) >= float(threshold) else "NEG")
        assert any(p.valueString == str(device.property[0].valueString) for p in device.property)
        if src.suffix == ".dcm":
            uid = pydicom.dcmread(src, stop_before_pixels=True, force=True).StudyInstanceUID
            assert report.identifier[0].value == f"urn:oid:{uid}"


def test_dicom_without_uids_is_a_named_skip(models: dict[str, Path], shared_dicoms: list[Path],
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = pydicom.dcmread(next(p for p in shared_dicoms if p.name == "Fake_MONOHR1.dcm"))
    del ds.StudyInstanceUID
    bad = tmp_path / "no_study_uid.dcm"
    ds.save_as(bad)
    dcm = tmp_path / "dicom"
    assert predict(models, "--out", str(tmp_path / "p.csv"), "--dicom-out", str(dcm), str(bad)) == 0
    _, rows = read_csv(tmp_path / "p.csv")
    assert [r[0] for r in rows] == [str(bad)]  # the prediction itself is kept
    skipped = [[s.path, s.reason] for s in read_skipped(dcm / "skipped.csv")]
    assert skipped == [[str(bad), "no DICOM SR can reference this image: no StudyInstanceUID"]]
    assert not (dcm / heatmap_folder(str(bad))).exists()  # never a half-written folder
    assert "1 DICOMs skipped" in capsys.readouterr().err


def test_reruns_skip_finished_reports_and_finish_interrupted_ones(models: dict[str, Path], shared_dicoms: list[Path],
                                                                  tmp_path: Path) -> None:
    out, dcm = tmp_path / "p.csv", tmp_path / "dicom"
    a, b = shared_dicoms[0], shared_dicoms[1]
    # A finished CSV-only run, then --dicom-out: the rows are done but the reports are not, so they are made.
    assert predict(models, "--out", str(out), str(a), str(b)) == 0
    assert predict(models, "--out", str(out), "--dicom-out", str(dcm), str(a), str(b)) == 0
    sr_a, sr_b = (dcm / heatmap_folder(str(p)) / SR_FILE for p in (a, b))
    assert sr_a.is_file() and sr_b.is_file()
    uid_b = pydicom.dcmread(sr_b).SOPInstanceUID
    stamp_a = sr_a.stat().st_mtime_ns
    # Interrupted before b's SR (written last) was on disk: the rerun redoes b only, with the same UIDs.
    sr_b.unlink()
    assert predict(models, "--out", str(out), "--dicom-out", str(dcm), str(a), str(b)) == 0
    assert sr_a.stat().st_mtime_ns == stamp_a
    assert pydicom.dcmread(sr_b).SOPInstanceUID == uid_b
    _, rows = read_csv(out)
    assert sorted(r[0] for r in rows) == sorted([str(a), str(b)])  # no duplicate rows
    assert not list(dcm.rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_serve_returns_the_sr_of_an_uploaded_dicom(models: dict[str, Path], shared_dicoms: list[Path],
                                                   png_paths: list[Path], tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from chexfound.serve import Predictor
    from chexfound.serve.app import create_app

    predictor = Predictor(models["backbone"], models["linear"], device="cpu")
    src = next(p for p in shared_dicoms if p.name == "Fake_MONOHR1.dcm")
    with TestClient(create_app(predictor)) as c:
        r = c.post("/v1/predict/sr", files={"file": (src.name, src.read_bytes())})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/dicom"
        out = tmp_path / "sr.dcm"
        out.write_bytes(r.content)
        ds = pydicom.dcmread(out)
        source = pydicom.dcmread(src, stop_before_pixels=True)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        back = read_sr_findings(ds)
        expected = predictor.predict_image(src).probabilities
        np.testing.assert_allclose([back[n]["Probability"] for n in predictor.findings], expected, atol=1e-5)
        assert dciodvfy_errors(out) == []
        # A PNG has no study; a DICOM without its UIDs cannot be referenced: both refused, by name.
        r = c.post("/v1/predict/sr", files={"file": ("x.png", png_paths[0].read_bytes())})
        assert r.status_code == 415 and r.json()["detail"].startswith("x.png: a PNG file, not DICOM")
        bad = pydicom.dcmread(src)
        del bad.SOPInstanceUID
        bad.save_as(tmp_path / "bad.dcm")
        r = c.post("/v1/predict/sr", files={"file": ("bad.dcm", (tmp_path / "bad.dcm").read_bytes())})
        assert r.status_code == 422 and "no SOPInstanceUID" in r.json()["detail"]
