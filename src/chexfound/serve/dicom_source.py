"""What the DICOM objects we write take from their source image: its identity and a clean copy of its patient
and study attributes.

Real DICOMs are not clean (dates written `1995.07.20`, a Patient's Age of `62`, a zero Pixel Spacing, two files
with one SOP Instance UID): an SR or secondary capture that copied them verbatim would inherit their errors.
`source_reference` copies only the attributes an SR and a secondary capture of the same study need, and only
values valid for their VR; an invalid value is dropped (Type 2 attributes are then written empty), never
passed on. A file that is not DICOM, or lacks the UIDs that tie a result to its study, is named, not half-used.
"""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Iterator

from pydicom import Dataset, config, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pydicom.valuerep import validate_value

from chexfound.io.dicom import has_dicom_marker, looks_like_acr_nema

log = logging.getLogger(__name__)

# The UIDs an SR needs to reference its source image in its study (a missing one: a named skip).
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# Patient and General Study modules (+ the Patient Study attributes worth keeping): copied when valid.
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize",
                 "PatientWeight", "IssuerOfPatientID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                 "AccessionNumber", "StudyDescription")
# Type 2 attributes of those modules: present (empty when unknown or invalid) in what we write.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")
_ENUMS = {"PatientSex": ("M", "F", "O")}
_SIGNATURES = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


class NotDicom(Exception):
    """The file is not DICOM (PNG, JPEG, ...): there is no study to attach results to."""


class MissingUIDs(Exception):
    """A DICOM without the UIDs (or with invalid ones) that an SR needs to reference it."""


@dataclass
class SourceReference:
    """The source image as our DICOM objects see it: a clean dataset (UIDs, patient, study, modality) and
    what was dropped from it and why."""

    path: str
    dataset: Dataset
    dropped: list[str] = field(default_factory=list)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


def _valid(keyword: str, elem: Any) -> str | None:
    """None when `elem` can be copied as is, else why not."""
    value = elem.value
    if value is None or value == "":
        return None
    values = list(value) if elem.VM > 1 else [value]
    if elem.VM > 1 and keyword in PATIENT_STUDY:
        return f"{elem.VM} values where one is allowed"
    for v in values:
        try:
            validate_value(elem.VR, v if elem.VR != "PN" else str(v), config.RAISE)
        except (ValueError, TypeError) as e:
            return f"{v!r} is not a valid {elem.VR} ({e})"
    if keyword in _ENUMS and str(value) not in _ENUMS[keyword]:
        return f"{value!r} is not one of {_ENUMS[keyword]}"
    return None


@contextmanager
def quiet_person_names() -> Iterator[None]:
    """highdicom advises on every single-component name (`Anonymized`): names are copied from the source as
    they are, valid for their VR, so the advice is noise in our logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name",
                                category=UserWarning)
        yield


def read_header(source: str | PathLike[str] | bytes, name: str | None = None) -> Dataset:
    """The DICOM header (no pixels) of a file or of bytes (an upload, named `name`), Part-10 or meta-less
    (ACR-NEMA style). Raises NotDicom for anything else (PNG, JPEG, ...)."""
    if isinstance(source, bytes):
        label, head, stream = name or "upload", source[:132], io.BytesIO(source)
    else:
        label = str(source)
        with open(source, "rb") as f:
            head = f.read(132)
        stream = None
    if not (has_dicom_marker(head) or looks_like_acr_nema(head)):
        kind = next((k for sig, k in _SIGNATURES if head.startswith(sig)), None)
        raise NotDicom(f"{label}: {'a ' + kind + ' file' if kind else 'no DICOM marker'}, not DICOM")
    try:
        return dcmread(stream if stream is not None else source, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as e:
        raise NotDicom(f"{label}: not a readable DICOM header ({e})") from e


def source_reference(ds: Dataset, path: str | PathLike[str]) -> SourceReference:
    """A clean reference dataset for the SR and secondary captures of `ds`. Raises MissingUIDs."""
    ref = Dataset()
    problems = []
    for kw in REQUIRED_UIDS:
        v = ds.get(kw)
        if v is None or str(v).strip() == "":
            problems.append(f"no {kw}")
        elif not UID(str(v)).is_valid:
            problems.append(f"{kw} {str(v)!r} is not a valid UID")
        else:
            setattr(ref, kw, UID(str(v)))
    if problems:
        raise MissingUIDs(f"{path}: no DICOM SR can reference this image: {', '.join(problems)}")
    dropped = []
    charset = ds.get("SpecificCharacterSet")
    if charset:
        ref.SpecificCharacterSet = charset
    for kw in ("Modality", "PatientOrientation", *PATIENT_STUDY):
        elem = ds.data_element(kw) if kw in ds else None
        if elem is None:
            continue
        why = _valid(kw, elem)
        if why is None:
            ref.add(elem)
        else:
            dropped.append(f"{kw}: {why}")
    for kw in TYPE2:
        if kw not in ref:
            setattr(ref, kw, None)
    if dropped:
        log.info("%s: not copied into the DICOM outputs: %s", path, "; ".join(dropped))
    return SourceReference(str(path), ref, dropped)
