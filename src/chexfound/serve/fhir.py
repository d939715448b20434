"""One image's findings as FHIR (R5): a Bundle holding a DiagnosticReport, one Observation per finding and the
model as a Device. Needs the `fhir` extra (fhir.resources), which validates every resource as it is built.

Each Observation: code = the finding; value = its probability (UCUM "1"); interpretation = POS/NEG when the
head calls it (v3 ObservationInterpretation); device = the model; every other field of the finding record
(threshold, its rule and evidence, and whatever the record grows) a component, from `finding_fields`, so a
new record field needs no change here. All resources are "preliminary": an algorithm's output nobody has
verified. DICOM inputs add their Study Instance UID as the report's identifier.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from chexfound.errors import ConfigError
from chexfound.serve.algorithm_id import AlgorithmIdentity
from chexfound.serve.finding_fields import FIELDS, record_fields

FINDING_SYSTEM = "urn:chexfound:finding"
FIELD_SYSTEM = "urn:chexfound:field"
SCHEME_URLS = {"DCM": "http://dicom.nema.org/resources/ontology/DCM", "SCT": "http://snomed.info/sct"}
UCUM = "http://unitsofmeasure.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
REPORT_CODE = {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}


def _models() -> dict[str, Any]:
    try:
        from fhir.resources.bundle import Bundle
        from fhir.resources.device import Device
        from fhir.resources.diagnosticreport import DiagnosticReport
        from fhir.resources.observation import Observation
    except ImportError as e:  # an optional extra: say how to get it
        raise ConfigError(None, "FHIR output needs the fhir extra: pip install 'chexfound[fhir]'") from e
    return {"Bundle": Bundle, "Device": Device, "DiagnosticReport": DiagnosticReport, "Observation": Observation}


def _coding(key: str) -> dict[str, Any]:
    f = FIELDS.get(key)
    if f is not None and f.code is not None and f.code[0] in SCHEME_URLS:
        scheme, code, meaning = f.code
        return {"system": SCHEME_URLS[scheme], "code": code, "display": meaning}
    meaning = f.meaning if f is not None else key.replace("_", " ").capitalize()
    return {"system": FIELD_SYSTEM, "code": key, "display": meaning}


def _value(kind: str, value: Any) -> dict[str, Any]:
    if kind == "number":
        return {"valueQuantity": {"value": float(value), "unit": "1", "system": UCUM, "code": "1"}}
    if kind == "flag":
        return {"valueBoolean": bool(value)}
    return {"valueString": str(value)}


def observation(record: dict[str, Any], device_ref: str, issued: str) -> dict[str, Any]:
    """One finding record -> an Observation (dict): probability as the value, the call as interpretation,
    every other field a component."""
    name = str(record["name"])
    obs: dict[str, Any] = {
        "resourceType": "Observation", "status": "preliminary",
        "code": {"coding": [{"system": FINDING_SYSTEM, "code": name, "display": name}], "text": name},
        "device": {"reference": device_ref}, "issued": issued, "component": [],
    }
    for key, f, value in record_fields(record):
        if key == "probability":
            obs.update(_value("number", value))
        elif key == "positive":
            code, display = ("POS", "Positive") if value else ("NEG", "Negative")
            obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": code, "display": display}]}]
        else:
            obs["component"].append({"code": {"coding": [_coding(key)], "text": f.meaning}, **_value(f.kind, value)})
    if not obs["component"]:
        del obs["component"]
    return obs


def device(identity: AlgorithmIdentity) -> dict[str, Any]:
    props = [{"type": {"text": line.split(": ", 1)[0]}, "valueString": line.split(": ", 1)[1]}
             for line in identity.parameters()]
    return {"resourceType": "Device", "displayName": identity.name, "manufacturer": identity.manufacturer,
            "version": [{"value": identity.version}], "property": props}


def report_bundle(findings: Sequence[dict[str, Any]], identity: AlgorithmIdentity, source: str | None = None,
                  study_instance_uid: str | None = None) -> Any:
    """A validated fhir.resources Bundle (type collection): DiagnosticReport + Observations + Device."""
    models = _models()
    issued = datetime.now(timezone.utc).isoformat(timespec="seconds")
    dev_url = f"urn:uuid:{uuid.uuid4()}"
    obs = [(f"urn:uuid:{uuid.uuid4()}", observation(r, dev_url, issued)) for r in findings]
    positive = [str(r["name"]) for r in findings if r.get("positive")]
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "status": "preliminary", "code": {"coding": [REPORT_CODE],
                                                                             "text": "chexfound chest X-ray findings"},
        "issued": issued, "result": [{"reference": url} for url, _ in obs],
        "conclusion": ("Called positive: " + ", ".join(positive)) if positive else "No finding called positive",
    }
    if study_instance_uid:
        report["identifier"] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_instance_uid}"}]
    if source:
        report["extension"] = [{"url": "urn:chexfound:source", "valueString": source}]
    entries = [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": report},
               *({"fullUrl": url, "resource": o} for url, o in obs),
               {"fullUrl": dev_url, "resource": device(identity)}]
    for e in entries:  # each resource against its own model (a Bundle types its entries loosely)
        e["resource"] = models[e["resource"]["resourceType"]].model_validate(e["resource"])
    return models["Bundle"].model_validate({"resourceType": "Bundle", "type": "collection", "timestamp": issued,
                                            "entry": entries})


def bundle_json(bundle: Any) -> str:
    return json.dumps(json.loads(bundle.model_dump_json(exclude_none=True)), indent=1)


def check_available() -> None:
    """Raise a ConfigError naming the extra when fhir.resources is not installed."""
    _models()


def report_path(root: Path, path: str | Path) -> Path:
    """One file per input, named as its heatmap folder (stem + hash of the absolute path: never a clash)."""
    from chexfound.serve.results import heatmap_folder

    return Path(root) / f"{heatmap_folder(path)}.fhir.json"


def write_report(root: Path, pred: Any, identity: AlgorithmIdentity, study_instance_uid: str | None = None) -> Path:
    """The Bundle of one Prediction, written atomically."""
    from chexfound.runio import atomic_write_text

    bundle = report_bundle(pred.findings_list(), identity, str(pred.path), study_instance_uid)
    return atomic_write_text(report_path(root, str(pred.path)), bundle_json(bundle))
