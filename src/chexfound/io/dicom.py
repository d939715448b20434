"""DICOM -> CXRImage: decoders via pydicom/pylibjpeg, then the display pipeline of PS3.3/PS3.4:

stored values -> BitsStored masking -> modality LUT (rescale slope/intercept or LUT) -> VOI (window
centre/width or VOI LUT) -> MONOCHROME1 inversion -> [0, 1].

ACR-NEMA files with neither preamble nor file meta are force-read; their transfer syntax is taken from
the encoding pydicom detected (implicit/explicit VR, endianness).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from chexfound.errors import CXRReadError
from chexfound.io.decoder_logs import decoder_messages
from chexfound.io.failures import ImageReadError, ReadFailure, clean_message
from chexfound.io.image import MAX_PIXELS, CXRImage, normalise_range
from chexfound.io.photometric import looks_inverted
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


def has_dicom_marker(data: bytes) -> bool:
    """Part-10 files carry "DICM" after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def looks_like_acr_nema(data: bytes) -> bool:
    """A meta-less DICOM starts with a group-0008 (or 0002) element tag in either byte order."""
    if len(data) < 8:
        return False
    le = int.from_bytes(data[0:2], "little")
    be = int.from_bytes(data[0:2], "big")
    return le in (0x0002, 0x0008) or be in (0x0002, 0x0008)


_NOT_DICOM = "not a recognised image format: no DICM marker, no PNG/JPEG/TIFF signature"


def decode_dicom(data: bytes, path: str, *, apply_voi: bool = True, color: str = "error") -> CXRImage:
    """Decode DICOM bytes (with or without preamble/file meta) into a CXRImage. Raises ImageReadError."""
    with decoder_messages(path):
        ds = _parse(data, path)
    return dataset_to_image(ds, path, apply_voi=apply_voi, color=color, raw=data)


def _parse(data: bytes, path: str) -> Any:
    pydicom = _import_pydicom()
    marked = has_dicom_marker(data)
    try:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # pydicom raises many types on corrupt headers
        why = clean_message(f"{type(e).__name__}: {e}")
        if not marked and not looks_like_acr_nema(data):
            raise ImageReadError(path, ReadFailure.NOT_AN_IMAGE, f"{_NOT_DICOM}, and it does not parse as a "
                                                                 f"meta-less DICOM ({why})") from e
        if isinstance(e, EOFError):
            raise ImageReadError(path, ReadFailure.TRUNCATED, f"truncated DICOM: the file ends inside its "
                                                              f"header ({why})") from e
        raise ImageReadError(path, ReadFailure.CORRUPT_HEADER, f"corrupt DICOM header ({why})") from e


def dataset_to_image(ds: Any, path: str, *, apply_voi: bool = True, color: str = "error",
                     raw: bytes | None = None) -> CXRImage:
    """A parsed dataset -> CXRImage. `raw` (the file's bytes) lets a missing or short Pixel Data element be
    told apart from a truncated file. Raises ImageReadError."""
    # pydicom warns about every non-conformant header element and logs plugin failures: held back here
    with decoder_messages(path) as said:
        try:
            return _dataset_to_image(ds, path, apply_voi=apply_voi, color=color, raw=raw)
        except CXRReadError:
            raise
        except MemoryError as e:
            raise ImageReadError(path, ReadFailure.TOO_LARGE, "too large: not enough memory to decode the "
                                                              "DICOM pixel data") from e
        except Exception as e:  # decoders and element parsing fail in many ways on corrupt files
            raise _decode_failure(path, e, ds, said) from e


def _decode_failure(path: str, e: Exception, ds: Any, said: list[str]) -> ImageReadError:
    """Which kind of failure a decoder exception means (pydicom's types do not say)."""
    msg = clean_message(str(e))
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = getattr(ts, "name", None) or str(ts or "unknown transfer syntax")
    if isinstance(e, AttributeError) and "Missing required element" in msg:
        return ImageReadError(path, ReadFailure.INVALID, f"DICOM image header incomplete: {msg}")
    if "less than expected" in msg:
        return ImageReadError(path, ReadFailure.TRUNCATED, f"truncated pixel data: {msg}")
    if "encapsulated" in msg or "Basic Offset Table" in msg or "fragment" in msg:
        return ImageReadError(path, ReadFailure.UNDECODABLE, f"undecodable {ts_name} pixel data: the fragment "
                                                             f"framing is damaged ({msg})")
    if isinstance(e, RuntimeError) and "plugins" in msg:
        return ImageReadError(path, ReadFailure.UNDECODABLE, f"undecodable {ts_name} payload: the decoders "
                                                             f"reject the compressed data ({msg})")
    detail = f"{type(e).__name__}: {msg}" + (f"; pydicom: {clean_message(said[-1])}" if said else "")
    return ImageReadError(path, ReadFailure.UNDECODABLE, f"cannot decode DICOM pixel data ({detail})")


# The (7FE0,0010) Pixel Data tag as it appears in little- and big-endian files.
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
_UNDEFINED_LENGTH = 0xFFFFFFFF


def pixel_data_extent(raw: bytes) -> tuple[int | None, int] | None:
    """(declared length or None when undefined/encapsulated, bytes the file holds after the element header)
    of the first Pixel Data element in `raw`; None when the tag does not occur."""
    for tag, order in zip(_PIXEL_DATA_TAGS, ("little", "big")):
        at = raw.find(tag)
        if at < 0:
            continue
        explicit = raw[at + 4:at + 6] in (b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"UN")
        head = 12 if explicit else 8
        if len(raw) < at + head:
            return None, 0
        n = int.from_bytes(raw[at + head - 4:at + head], order)  # type: ignore[arg-type]
        return (None if n == _UNDEFINED_LENGTH else n), len(raw) - at - head
    return None


def _missing_pixel_data(ds: Any, path: str, raw: bytes | None) -> ImageReadError:
    """Why a dataset has no Pixel Data element: cut off, not DICOM at all, or an object without an image."""
    kinds = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
    if kinds:
        return ImageReadError(path, ReadFailure.UNSUPPORTED, f"DICOM has unsupported {kinds[0]}")
    if raw is not None and pixel_data_extent(raw) is not None:
        # pydicom drops an element it could not finish reading (e.g. no sequence delimiter before the end)
        return ImageReadError(path, ReadFailure.TRUNCATED, "truncated pixel data: the file ends inside the "
                                                           "Pixel Data element")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if raw is not None and not has_dicom_marker(raw) and not (rows and cols):
        return ImageReadError(path, ReadFailure.NOT_AN_IMAGE, f"{_NOT_DICOM}, and read as a meta-less DICOM it "
                                                              "holds no image elements")
    sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if rows and cols:
        what = f"the header describes a {rows}x{cols} image, but no Pixel Data element follows"
    elif sop:
        name = str(getattr(sop, "name", sop))
        what = (f"a {name} object without a Pixel Data element" if "Image" in name
                else f"not an image object: {name}")
    elif raw is not None and len(raw) <= 132:
        return ImageReadError(path, ReadFailure.TRUNCATED, "truncated DICOM: the file ends after its DICM marker")
    else:  # a DICM marker, then bytes that parse as nothing a DICOM object has (no SOP class, no image)
        return ImageReadError(path, ReadFailure.CORRUPT_HEADER, "corrupt DICOM: after the DICM marker there is no "
                                                                "SOP class, image attribute or pixel data")
    return ImageReadError(path, ReadFailure.NO_PIXEL_DATA, f"DICOM has no pixel data ({what})")


# Transfer syntaxes whose codestream may have discarded information (PS3.5 Table A-1 / 8-1): JPEG lossy
# processes, JPEG-LS near-lossless, JPEG 2000 and HTJ2K "any" (lossless or lossy), JPEG XL, MPEG/HEVC video.
_LOSSY_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112",
    *(f"1.2.840.10008.1.2.4.{k}" for k in range(100, 109)),
})


def is_lossy(ds: Any, ts: Any) -> bool:
    """True when the pixels went through lossy compression: Lossy Image Compression (0028,2110) says "01"
    (it stays set after a lossy image is re-stored uncompressed), or the transfer syntax is a lossy one."""
    flag = (_text(ds, "LossyImageCompression") or "").strip()
    if flag == "01":
        return True
    if flag == "00" and str(ts) in ("1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203"):
        return False  # a "lossless or lossy" syntax that the header says was used losslessly
    return str(ts) in _LOSSY_SYNTAXES


def _is_compressed(ts: Any) -> bool:
    try:
        return bool(ts.is_compressed)
    except ValueError:  # not a transfer syntax pydicom knows: let the decoder say so
        return True


def _check_native_length(ds: Any, path: str, raw: bytes | None, rows: int, cols: int, samples: int,
                         bits_alloc: int) -> None:
    """Uncompressed pixel data shorter than the header needs: a cut-off file (say so, with the numbers) or
    a header that contradicts its data."""
    have = len(ds.PixelData)
    need = -(-rows * cols * samples * max(bits_alloc, 1) // 8)
    if have >= need:
        return
    extent = pixel_data_extent(raw) if raw is not None else None
    if extent is not None and extent[0] is not None and extent[1] < extent[0]:
        raise ImageReadError(path, ReadFailure.TRUNCATED, f"truncated pixel data: the file ends after {extent[1]:,} "
                                                          f"of the {extent[0]:,} bytes its Pixel Data element declares")
    raise ImageReadError(path, ReadFailure.INVALID, f"pixel data hold {have:,} bytes; the header's {rows}x{cols} "
                                                    f"image at {bits_alloc} bits needs {need:,}")


def _dataset_to_image(ds: Any, path: str, *, apply_voi: bool, color: str, raw: bytes | None) -> CXRImage:
    if "PixelData" not in ds:
        raise _missing_pixel_data(ds, path, raw)
    had_meta = _ensure_transfer_syntax(ds)
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or cols <= 0:
        raise ImageReadError(path, ReadFailure.INVALID, f"DICOM has invalid Rows/Columns ({rows}x{cols})")
    frames_raw = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames_raw or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise ImageReadError(path, ReadFailure.UNSUPPORTED,
                             f"multi-frame DICOM ({frames} frames); a radiograph has one frame")
    if rows * cols > MAX_PIXELS:
        raise ImageReadError(path, ReadFailure.TOO_LARGE,
                             f"too large: {rows}x{cols} pixels, over the limit of {MAX_PIXELS:,} pixels")
    samples = int(ds.get("SamplesPerPixel") or 1)
    photometric = (_text(ds, "PhotometricInterpretation") or ("MONOCHROME2" if samples == 1 else "RGB")).upper()
    is_colour = samples != 1 or photometric not in _MONO
    if is_colour and (color != "luminance" or photometric not in _COLOUR_OK or samples != 3):
        raise ImageReadError(
            path, ReadFailure.UNSUPPORTED, f"colour DICOM ({photometric}, {samples} samples/pixel); chest X-rays are grayscale"
            + ("" if color == "luminance" else " (pass color='luminance' to convert)")
        )
    bits_alloc = int(ds.get("BitsAllocated") or 0)
    bits_stored = int(ds.get("BitsStored") or bits_alloc or 0)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    ts = ds.file_meta.TransferSyntaxUID
    if not _is_compressed(ts):
        _check_native_length(ds, path, raw, rows, cols, samples, bits_alloc)
    try:
        arr = ds.pixel_array
    except NotImplementedError as e:
        raise ImageReadError(path, ReadFailure.UNSUPPORTED, f"no decoder available for transfer syntax {ts} "
                                                            f"({getattr(ts, 'name', ts)}): {e}") from e
    arr = np.asarray(arr)
    if arr.ndim == 3 and is_colour:
        if arr.shape[-1] != 3:
            raise ImageReadError(path, ReadFailure.INVALID, f"unexpected colour pixel array shape {arr.shape}")
        # pydicom's pixel_array already converts YBR_* to RGB (as_rgb=True); Rec. 601 luma:
        rgb = arr.astype(np.float64)
        arr = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    if arr.shape != (rows, cols):
        raise ImageReadError(path, ReadFailure.INVALID,
                             f"decoded pixel array has shape {arr.shape}, header says {rows}x{cols}")

    meta: dict[str, Any] = {
        "source_format": "DICOM",
        "transfer_syntax": str(ts),
        "transfer_syntax_name": getattr(ts, "name", str(ts)),
        "has_file_meta": had_meta,
        "lossy": is_lossy(ds, ts),
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
        if looks_inverted(pixels):  # read as the header says, but say that it looks wrong (io/photometric.py)
            meta.setdefault("warnings", []).append(
                f"the header says {photometric}"
                + (" with an INVERSE presentation LUT" if photometric == "MONOCHROME2" else " (minimum = white)")
                + ", but the pixels look like the opposite: read as the header says, the image looks like a "
                "negative (mediastinum darker than the lungs); check the file before trusting the findings")
    else:
        meta["inverted"] = False
    if not np.isfinite(pixels).all():
        raise ImageReadError(path, ReadFailure.INVALID, "DICOM pixel data contain non-finite values")
    return CXRImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), meta=meta)
