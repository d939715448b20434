"""The per-finding record -> SR content items and FHIR components, generically: a field the record grows
(a calibrated probability, an "uninformative" flag) reaches both reports without code changes."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from chexfound.serve.algorithm_id import AlgorithmIdentity
from chexfound.serve.dicom_out import dataset_bytes
from chexfound.serve.dicom_source import MissingUIDs, NotDicom, read_header, source_reference
from chexfound.serve.dicom_sr import build_sr, group_content, read_sr_findings
from chexfound.serve.fhir import observation, report_bundle

from .test_dicom_outputs import dciodvfy_errors

IDENTITY = AlgorithmIdentity("chexfound linear head on tiny_vit", "0.1.0", "ab" * 32, "cd" * 32, "multilabel",
                             "linear_patch_contribution")
RECORD = {"name": "Pleural_Thickening", "probability": 0.25, "threshold": 0.3, "positive": False,
          "threshold_rule": "prevalence", "threshold_reason": None,
          # fields another part of the package may add: typed by value, no table entry needed
          "uninformative": True, "uncalibrated_probability": 0.4}


def test_group_content_types_every_field_by_its_value() -> None:
    measurements, evaluations, params = group_content(RECORD)
    assert sorted(m[0].ConceptNameCodeSequence[0].CodeMeaning for m in measurements) == [
        "Decision threshold", "Probability", "Uncalibrated probability"]
    names = sorted(e[0].ConceptNameCodeSequence[0].CodeMeaning for e in evaluations)
    assert names == ["Pleural_Thickening", "Uninformative"]  # the call as the finding Present/Absent
    assert params == ["threshold_rule: prevalence"]  # None = not stated: left out


def test_new_fields_reach_the_sr_and_fhir(data_root: Path, tmp_path: Path) -> None:
    src = data_root / "dicom" / "RG1_J2KI.dcm"
    sr = build_sr(source_reference(read_header(src), src), [RECORD], IDENTITY)
    out = tmp_path / "sr.dcm"
    out.write_bytes(dataset_bytes(sr))
    back = read_sr_findings(pydicom.dcmread(out))["Pleural_Thickening"]
    assert back == {"Probability": 0.25, "Decision threshold": 0.3, "Uncalibrated probability": 0.4,
                    "present": False, "Uninformative": True}
    assert dciodvfy_errors(out) == []
    obs = observation(RECORD, "urn:uuid:x", "2026-01-01T00:00:00Z")
    comps = {c["code"]["coding"][0]["code"]: c for c in obs["component"]}
    assert comps["uninformative"]["valueBoolean"] is True
    assert comps["uncalibrated_probability"]["valueQuantity"]["value"] == 0.4
    assert obs["interpretation"][0]["coding"][0]["code"] == "NEG"
    report_bundle([RECORD], IDENTITY)  # validates against the fhir.resources models


def test_headers_name_what_is_wrong(data_root: Path, png_paths: list[Path], tmp_path: Path) -> None:
    with pytest.raises(NotDicom, match="a PNG file, not DICOM"):
        read_header(png_paths[0])
    ds = pydicom.dcmread(data_root / "dicom" / "Fake_MONOHR1.dcm")
    ds.SeriesInstanceUID = "1.2.x"
    with pytest.raises(MissingUIDs, match="SeriesInstanceUID '1.2.x' is not a valid UID"):
        source_reference(ds, "f.dcm")
    ref = source_reference(pydicom.dcmread(data_root / "dicom" / "Fake_MONOHR1.dcm"), "f.dcm")
    assert "PatientAge" not in ref.dataset and ref.dropped and ref.dropped[0].startswith("PatientAge")
