"""Build small DICOM files in tests (pydicom), so each pipeline step is checked against known numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def make_dataset(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                 signed: bool = False, **elements: Any) -> FileDataset:
    arr = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("synthetic.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "TEST01"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.SamplesPerPixel = 1 if arr.ndim == 2 else int(arr.shape[-1])
    if arr.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    alloc = arr.dtype.itemsize * 8
    ds.BitsAllocated = alloc
    ds.BitsStored = bits_stored or alloc
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for k, v in elements.items():
        setattr(ds, k, v)
    ds.PixelData = arr.tobytes()
    return ds


def save(ds: FileDataset, path: Path, *, implicit: bool | None = None, big_endian: bool = False) -> Path:
    """Write as a conformant file (preamble + meta), re-encoding if asked."""
    from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif big_endian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        arr = np.frombuffer(ds.PixelData, dtype=f"<u{ds.BitsAllocated // 8}")
        ds.PixelData = arr.astype(f">u{ds.BitsAllocated // 8}").tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def save_acr_nema(ds: FileDataset, path: Path) -> Path:
    """Write the bare dataset (implicit VR LE): no 128-byte preamble, no 'DICM', no file meta."""
    from pydicom.filewriter import write_dataset

    body = pydicom.dataset.Dataset(ds)
    with open(path, "wb") as f:
        fp = pydicom.filebase.DicomFileLike(f)
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, body)
    return path
