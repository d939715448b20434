"""DICOM -> CXRImage: decoders via pydicom/pylibjpeg, then the display pipeline of PS3.3/PS3.4:

stored values -> BitsStored masking -> modality LUT (rescale slope/intercept or LUT) -> VOI (window
centre/width or VOI LUT) -> MONOCHROME1 inversion -> [0, 1].

ACR-NEMA files with neither preamble nor file meta are force-read; their transfer syntax is taken from
the encoding pydicom detected (implicit/explicit VR, endianness).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from chexfound.errors import CXRReadError
from chexfound.io.image import MAX_PIXELS, CXRImage, normalise_range
from chexfound.io.voi import apply_voi_lut_item, apply_window, window_params

_MONO = ("MONOCHROME1", "MONOCHROME2")
_COLOUR_OK = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


def _import_pydicom() -> Any:
    import pydicom

    return pydicom


def _text(ds: Any, key: str) -> str | None:
    v = ds.get(key)
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _spacing(ds: Any) -> list[float] | None:
    """(row, column) spacing in mm: PixelSpacing, else ImagerPixelSpacing (at the detector). 0 = unknown."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(key)
        try:
            vals = [float(x) for x in v] if v is not None else []
        except (TypeError, ValueError):
            continue
        if len(vals) == 2 and all(np.isfinite(x) and x > 0 for x in vals):
            return vals
    return None


def _ensure_transfer_syntax(ds: Any) -> bool:
    """Give an ACR-NEMA / meta-less dataset the transfer syntax it was actually parsed with.

    Returns True when the file had its own file meta transfer syntax.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return True
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit = True
    if little is None:
        little = True
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    )
    return False


def _mask_bits(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Keep the low `bits_stored` bits (overlay or garbage bits above them are not image data)."""
    if arr.dtype.kind not in "iu":
        return arr
    nbits = arr.dtype.itemsize * 8
    if not 0 < bits_stored < nbits:
        return arr
    a = arr.astype(np.int64)
    a &= (1 << bits_stored) - 1
    if signed:  # two's complement sign extension from the stored high bit
        sign = 1 << (bits_stored - 1)
        a = (a ^ sign) - sign
    return a


def _modality(arr: np.ndarray, ds: Any) -> tuple[np.ndarray, dict[str, Any]]:
    info: dict[str, Any] = {}
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        from pydicom.pixels import apply_modality_lut

        info["modality_lut"] = True
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64), info
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    try:
        s = float(slope) if slope is not None and str(slope).strip() != "" else 1.0
        b = float(intercept) if intercept is not None and str(intercept).strip() != "" else 0.0
    except (TypeError, ValueError):
        s, b = 1.0, 0.0
    if not (np.isfinite(s) and np.isfinite(b)) or s == 0:
        s, b = 1.0, 0.0
    if s != 1.0 or b != 0.0:
        info["rescale"] = [s, b]
        return arr.astype(np.float64) * s + b, info
    return arr, info


def decode_dicom(data: bytes, path: str, *, apply_voi: bool = True, color: str = "error") -> CXRImage:
    """Decode DICOM bytes (with or without preamble/file meta) into a CXRImage. Raises CXRReadError."""
    pydicom = _import_pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every non-conformant header element
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError) as e:
        raise CXRReadError(path, f"not a readable DICOM file ({e})") from e
    except Exception as e:  # pydicom raises many types on corrupt headers
        raise CXRReadError(path, f"corrupt DICOM header ({type(e).__name__}: {e})") from e
    return dataset_to_image(ds, path, apply_voi=apply_voi, color=color)


def dataset_to_image(ds: Any, path: str, *, apply_voi: bool = True, color: str = "error") -> CXRImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid VRs etc. in headers we only read
            return _dataset_to_image(ds, path, apply_voi=apply_voi, color=color)
    except CXRReadError:
        raise
    except MemoryError as e:
        raise CXRReadError(path, "DICOM pixel data too large to decode") from e
    except Exception as e:  # decoders and element parsing fail in many ways on corrupt files
        raise CXRReadError(path, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e


def _dataset_to_image(ds: Any, path: str, *, apply_voi: bool, color: str) -> CXRImage:
    if "PixelData" not in ds:
        kinds = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        why = f"unsupported {kinds[0]}" if kinds else "no pixel data (not an image object)"
        raise CXRReadError(path, f"DICOM has {why}")
    had_meta = _ensure_transfer_syntax(ds)
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or cols <= 0:
        raise CXRReadError(path, f"DICOM has invalid Rows/Columns ({rows}x{cols})")
    frames_raw = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames_raw or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise CXRReadError(path, f"multi-frame DICOM ({frames} frames); a radiograph has one frame")
    if rows * cols > MAX_PIXELS:
        raise CXRReadError(path, f"DICOM claims {rows}x{cols} px, beyond the {MAX_PIXELS} pixel limit")
    samples = int(ds.get("SamplesPerPixel") or 1)
    photometric = (_text(ds, "PhotometricInterpretation") or ("MONOCHROME2" if samples == 1 else "RGB")).upper()
    is_colour = samples != 1 or photometric not in _MONO
    if is_colour and (color != "luminance" or photometric not in _COLOUR_OK or samples != 3):
        raise CXRReadError(
            path, f"colour DICOM ({photometric}, {samples} samples/pixel); chest X-rays are grayscale"
            + ("" if color == "luminance" else " (pass color='luminance' to convert)")
        )
    bits_alloc = int(ds.get("BitsAllocated") or 0)
    bits_stored = int(ds.get("BitsStored") or bits_alloc or 0)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    ts = ds.file_meta.TransferSyntaxUID

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except NotImplementedError as e:
        raise CXRReadError(path, f"no decoder available for transfer syntax {ts} ({getattr(ts, 'name', ts)}): {e}") from e
    arr = np.asarray(arr)
    if arr.ndim == 3 and is_colour:
        if arr.shape[-1] != 3:
            raise CXRReadError(path, f"unexpected colour pixel array shape {arr.shape}")
        # pydicom's pixel_array already converts YBR_* to RGB (as_rgb=True); Rec. 601 luma:
        rgb = arr.astype(np.float64)
        arr = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    if arr.shape != (rows, cols):
        raise CXRReadError(path, f"decoded pixel array has shape {arr.shape}, header says {rows}x{cols}")

    meta: dict[str, Any] = {
        "source_format": "DICOM",
        "transfer_syntax": str(ts),
        "transfer_syntax_name": getattr(ts, "name", str(ts)),
        "has_file_meta": had_meta,
        "original_size": [rows, cols],
        "bit_depth": bits_stored,
        "bits_allocated": bits_alloc,
        "signed": signed,
        "photometric_interpretation": photometric,
        "modality": _text(ds, "Modality"),
        "body_part": _text(ds, "BodyPartExamined"),
        "view_position": _text(ds, "ViewPosition"),
        "patient_id": _text(ds, "PatientID"),
        "study_id": _text(ds, "StudyInstanceUID") or _text(ds, "StudyID"),
        "series_id": _text(ds, "SeriesInstanceUID"),
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "pixel_spacing": _spacing(ds),
    }

    if not is_colour:
        arr = _mask_bits(arr, bits_stored, signed)
        meta["stored_range"] = [float(arr.min()), float(arr.max())]  # before rescale/VOI, for diagnostics
    arr, mod_info = _modality(arr, ds)
    meta.update(mod_info)

    pixels: np.ndarray | None = None
    if apply_voi and not is_colour:
        voi_seq = ds.get("VOILUTSequence")
        if voi_seq is not None and len(voi_seq) and "LUTDescriptor" in voi_seq[0] and "LUTData" in voi_seq[0]:
            pixels = apply_voi_lut_item(arr, voi_seq[0])
            meta["voi"] = "lut"
        else:
            wp = window_params(ds)
            if wp is not None:
                pixels = apply_window(arr, *wp)
                meta["voi"] = "window"
                meta["window"] = [wp[0], wp[1]]
                meta["voi_function"] = wp[2]
    if pixels is None:
        meta["voi"] = None
        # Without a VOI the display range is the data's own: 8-bit data without rescale keep their nominal
        # 0..2^bits-1 (already display-ready, so two 8-bit files stay comparable); deeper data use their
        # real min..max (a 12-bit image in 16-bit words would otherwise be nearly black).
        if not is_colour and bits_stored and bits_stored <= 8 and not mod_info and not signed:
            pixels = normalise_range(arr, 0, 2**bits_stored - 1)
        else:
            pixels = normalise_range(arr)
    if photometric == "MONOCHROME1" or (
        photometric == "MONOCHROME2" and (_text(ds, "PresentationLUTShape") or "").upper() == "INVERSE"
    ):
        pixels = 1.0 - pixels  # minimum value is white: invert so air is dark as displayed
        meta["inverted"] = True
    else:
        meta["inverted"] = False
    if not np.isfinite(pixels).all():
        raise CXRReadError(path, "DICOM pixel data contain non-finite values")
    return CXRImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), meta=meta)
