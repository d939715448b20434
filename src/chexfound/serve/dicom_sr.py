"""One image's findings as a DICOM Comprehensive SR: TID 1500 Measurement Report, written with highdicom.

The report (a new series in the source image's study; patient and study copied from the clean
`dicom_source.SourceReference`) holds one TID 1501 Measurement Group per finding:
    tracking identifier (the finding's name, a UID), finding type (the finding, coded in our private scheme),
    algorithm identification (TID 4019: name, version, and as parameters the weights SHA-256 and the finding's
    text fields such as the threshold rule), the source image (SOP Class/Instance UIDs),
    numeric fields (probability, threshold, ...) as measurements (unit: UCUM "1"),
    flags as qualitative evaluations (`positive`: the finding Present/Absent; others Yes/No).
The observer is the model as a device (TID 1004). What goes in a group comes from `finding_fields`:
`group_content` maps one finding record to its content items, so a new record field needs no change here.
"""

from __future__ import annotations

from typing import Any, Sequence

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from chexfound.serve.algorithm_id import AlgorithmIdentity
from chexfound.serve.dicom_source import SourceReference, quiet_person_names
from chexfound.serve.finding_fields import CODING_SCHEME, record_fields

SR_SERIES_NUMBER = 9001  # high numbers keep derived series after the acquired ones in a viewer's list
SERIES_DESCRIPTION = "chexfound AI findings (not for diagnosis)"
UNITLESS = codes.UCUM.NoUnits
PROCEDURE = codes.SCT.ChestImaging


def concept(scheme: str, value: str, meaning: str) -> CodedConcept:
    # LO holds 64 characters; longer values go in as LongCodeValue (highdicom picks it by length).
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


def finding_concept(name: str) -> CodedConcept:
    """A finding (NIH-14 name, class name...) coded in our private scheme: these vocabularies have no one
    standard code set, and a wrong SNOMED code is worse than an honest private one."""
    return concept(CODING_SCHEME, name, name)


def device_uid(identity: AlgorithmIdentity) -> str:
    """One UID per set of weights (the same model always is the same device)."""
    return generate_uid(entropy_srcs=[identity.backbone_sha256, identity.head_sha256 or "", identity.name])


def group_content(record: dict[str, Any]) -> tuple[list[Measurement], list[QualitativeEvaluation], list[str]]:
    """One finding record -> (measurements, qualitative evaluations, algorithm parameters): numbers are
    measurements, flags qualitative evaluations, texts `field: value` parameters."""
    measurements, evaluations, params = [], [], []
    finding = finding_concept(str(record["name"]))
    for key, f, value in record_fields(record):
        if f.kind == "number":
            measurements.append(Measurement(name=concept(*f.coded(key)), value=float(value), unit=UNITLESS))
        elif f.kind == "flag" and f.presence:
            evaluations.append(QualitativeEvaluation(finding, codes.SCT.Present if value else codes.SCT.Absent))
        elif f.kind == "flag":
            evaluations.append(QualitativeEvaluation(concept(*f.coded(key)), codes.SCT.Yes if value else codes.SCT.No))
        else:
            params.append(f"{key}: {value}")
    return measurements, evaluations, params


def measurement_group(record: dict[str, Any], identity: AlgorithmIdentity,
                      source: SourceReference) -> MeasurementsAndQualitativeEvaluations:
    measurements, evaluations, params = group_content(record)
    name = str(record["name"])
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=name[:64]),
        finding_type=finding_concept(name),
        algorithm_id=AlgorithmIdentification(name=identity.name, version=identity.version,
                                             manufacturer=identity.manufacturer,
                                             parameters=[*identity.parameters(), *params]),
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=[SourceImageForMeasurementGroup(referenced_sop_class_uid=source.dataset.SOPClassUID,
                                                      referenced_sop_instance_uid=source.dataset.SOPInstanceUID)],
    )


def build_sr(source: SourceReference, findings: Sequence[dict[str, Any]], identity: AlgorithmIdentity,
             series_instance_uid: str | None = None, sop_instance_uid: str | None = None) -> ComprehensiveSR:
    """The Comprehensive SR for one image: `findings` as `Prediction.findings_list()` gives them."""
    with quiet_person_names():
        return _build_sr(source, findings, identity, series_instance_uid, sop_instance_uid)


def _build_sr(source: SourceReference, findings: Sequence[dict[str, Any]], identity: AlgorithmIdentity,
              series_instance_uid: str | None, sop_instance_uid: str | None) -> ComprehensiveSR:
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(identity), name=identity.name[:64], manufacturer_name=identity.manufacturer,
            model_name=identity.name[:64]))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=[measurement_group(r, identity, source) for r in findings],
    )
    return ComprehensiveSR(
        evidence=[source.dataset],
        content=report[0],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=identity.manufacturer,
        is_complete=True,
        series_description=SERIES_DESCRIPTION,
    )


def read_sr_findings(ds: Any) -> dict[str, dict[str, Any]]:
    """Back from an SR written by `build_sr` (a pydicom Dataset or a highdicom SR), read with highdicom:
    finding -> {measurement meaning: value, "present": bool, other flags by meaning}."""
    sr = ds if isinstance(ds, ComprehensiveSR) else ComprehensiveSR.from_dataset(ds)
    out: dict[str, dict[str, Any]] = {}
    for group in sr.content.get_image_measurement_groups():
        finding = group.finding_type
        rec: dict[str, Any] = {}
        for m in group.get_measurements():
            rec[str(m.name.meaning)] = float(m.value)
        for q in group.get_qualitative_evaluations():
            if finding is not None and q.name == finding:
                rec["present"] = q.value == codes.SCT.Present
            else:
                rec[str(q.name.meaning)] = q.value == codes.SCT.Yes
        out[str(finding.meaning) if finding is not None else str(len(out))] = rec
    return out
