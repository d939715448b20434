"""One finding's heatmap as a DICOM Secondary Capture in a new series of the source image's study (highdicom).

Why a Secondary Capture and not a Segmentation or Parametric Map (both of which highdicom writes): those carry
the map as data registered to the source's pixel grid and plane geometry, and chest radiographs give them
nothing to stand on (no frame of reference; the shared files even record a zero Pixel Spacing), while the
map itself lives on the model's cropped and resized field of view. A PACS shows any Secondary Capture beside
the original, and what a reader needs is the picture: the overlay burned in, with "NOT FOR DIAGNOSIS", the
finding, its probability and the kind of map written into the pixels and the header (Burned In Annotation
YES, Image Comments). The source image is referenced (Source Image Sequence, purpose: source image for image
processing operation); patient and study come from the clean `dicom_source.SourceReference`.
"""

from __future__ import annotations


import highdicom as hd
import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.codedict import codes

from chexfound.serve.algorithm_id import AlgorithmIdentity
from chexfound.serve.dicom_source import SourceReference, quiet_person_names

HEATMAP_SERIES_NUMBER = 9002
SERIES_DESCRIPTION = "chexfound heatmaps (NOT FOR DIAGNOSIS)"
LABEL = "NOT FOR DIAGNOSIS"
_ORIENTATION = set("APRLHF")


def _orientation(ds: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two plain biped directions, else None (unknown: the SC
    then states none rather than guess from the view position)."""
    value = ds.get("PatientOrientation")
    if value is None or len(value) != 2:
        return None
    row, col = (str(v) for v in value)
    return (row, col) if row in _ORIENTATION and col in _ORIENTATION else None


def labelled(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """The overlay with a black band on top holding `lines` in white (burned in: what any viewer shows)."""
    h, w, _ = rgb.shape
    size = max(12, w // 40)
    font = ImageFont.load_default(size=size)
    band = (size + 6) * len(lines) + 6
    canvas = Image.new("RGB", (w, h + band), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, 6 + i * (size + 6)), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def build_heatmap_sc(source: SourceReference, overlay_rgb: np.ndarray, finding: str, probability: float,
                     identity: AlgorithmIdentity, kind_description: str, instance_number: int,
                     series_instance_uid: str, sop_instance_uid: str | None = None) -> SCImage:
    """A Secondary Capture of one finding's overlay (uint8 RGB [H, W, 3], the model's view with the map)."""
    ref = source.dataset
    kind = identity.heatmap_kind or "heatmap"
    pixels = labelled(np.ascontiguousarray(overlay_rgb, dtype=np.uint8), [
        f"{LABEL} - chexfound {identity.version}",
        f"{finding}: p = {probability:.3f}",
        kind.replace("_", " "),
    ])
    orientation = _orientation(ref)
    with quiet_person_names():
        sc = SCImage(
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=ref.StudyInstanceUID,
            series_instance_uid=series_instance_uid,
            series_number=HEATMAP_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or hd.UID(),
            instance_number=instance_number,
            manufacturer=identity.manufacturer,
            patient_id=ref.PatientID,
            patient_name=ref.PatientName,
            patient_birth_date=ref.PatientBirthDate,
            patient_sex=ref.PatientSex,
            accession_number=ref.AccessionNumber,
            study_id=ref.StudyID,
            study_date=ref.StudyDate,
            study_time=ref.StudyTime,
            referring_physician_name=ref.ReferringPhysicianName,
            patient_orientation=orientation or ("L", "F"),  # highdicom needs one; cleared below when unknown
            series_description=SERIES_DESCRIPTION,
        )
    if orientation is None:
        sc.PatientOrientation = None  # Type 2C: present and empty = not known
    if "Laterality" not in sc:
        sc.Laterality = None  # Type 2C (dciodvfy asks for it): empty, the chest as a whole is not lateral
    for kw in ("PatientAge", "PatientSize", "PatientWeight", "IssuerOfPatientID", "StudyDescription"):
        if kw in ref:
            sc.add(ref[kw])
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = (f"{LABEL}. chexfound heatmap for {finding} (p = {probability:.4f}): {kind_description}. "
                        f"Model: {identity.name} {identity.version}, backbone weights SHA-256 "
                        f"{identity.backbone_sha256}")[:10240]
    sc.DerivationDescription = f"{kind} of {identity.name} overlaid on the model's view of the source image"[:1024]
    sc.SourceImageSequence = [_source_item(ref)]
    return sc


def _source_item(ref: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    purpose = hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item

