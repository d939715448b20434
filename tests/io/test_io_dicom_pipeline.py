"""Each DICOM display step on synthetic files with known numbers, and each codec on real pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from io_dicom_factory import make_dataset, save, save_acr_nema
from io_jpeg_lossless import encode_jpeg_lossless
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless

from chexfound.errors import CXRReadError
from chexfound.io import read_image

RAMP = (np.arange(32 * 48).reshape(32, 48) * 2).astype(np.uint16)  # 0..3070, fits in 12 bits


@pytest.fixture(scope="module")
def rg1_crop(data_root: Path) -> np.ndarray:
    """A 96x80 crop of real 15-bit CR pixels (the RG1 uncompressed file), for codec round trips."""
    ds = pydicom.dcmread(data_root / "dicom" / "RG1_UNCR.dcm")
    return np.ascontiguousarray(ds.pixel_array[900:996, 800:880])


def test_no_voi_uses_real_range(tmp_path: Path) -> None:
    img = read_image(save(make_dataset(RAMP, bits_stored=12), tmp_path / "a.dcm"))
    np.testing.assert_allclose(img.pixels, RAMP / RAMP.max(), atol=1e-6)
    assert img.meta["voi"] is None and img.meta["bit_depth"] == 12


def test_eight_bit_keeps_nominal_range(tmp_path: Path) -> None:
    a = (RAMP % 200 + 20).astype(np.uint8)
    img = read_image(save(make_dataset(a), tmp_path / "a.dcm"))
    np.testing.assert_allclose(img.pixels, a / 255.0, atol=1e-6)


def test_bits_stored_masks_high_bits(tmp_path: Path) -> None:
    garbage = RAMP | np.uint16(0xF000)  # overlay/garbage in the 4 unused high bits
    clean = read_image(save(make_dataset(RAMP, bits_stored=12), tmp_path / "c.dcm"))
    dirty = read_image(save(make_dataset(garbage, bits_stored=12), tmp_path / "d.dcm"))
    assert np.array_equal(clean.pixels, dirty.pixels)


def test_signed_pixels_sign_extended(tmp_path: Path) -> None:
    vals = RAMP.astype(np.int32) - 1500  # -1500..1570 in 12-bit two's complement
    stored = (vals & 0xFFF).astype(np.uint16)  # high bits zero: sign bit is bit 11
    img = read_image(save(make_dataset(stored.view(np.int16), bits_stored=12, signed=True), tmp_path / "s.dcm"))
    np.testing.assert_allclose(img.pixels, (vals - vals.min()) / np.ptp(vals), atol=1e-6)


def test_rescale_then_window_linear(tmp_path: Path) -> None:
    # modality value = 2*x - 1000; window centre 1000 width 2001 covers exactly [0, 2000]
    ds = make_dataset(RAMP, bits_stored=12, RescaleSlope="2", RescaleIntercept="-1000",
                      WindowCenter="1000.5", WindowWidth="2001")
    img = read_image(save(ds, tmp_path / "w.dcm"))
    hu = RAMP.astype(np.float64) * 2 - 1000
    expect = np.clip((hu - 1000.0) / 2000.0 + 0.5, 0, 1)  # PS3.3 LINEAR: (x - (c-0.5))/(w-1) + 0.5
    np.testing.assert_allclose(img.pixels, expect, atol=1e-6)
    assert img.meta["rescale"] == [2.0, -1000.0] and img.meta["voi"] == "window"
    assert (img.pixels == 0).any() and (img.pixels == 1).any()  # outside the window saturates


def test_window_functions_and_multivalued(tmp_path: Path) -> None:
    ds = make_dataset(RAMP, bits_stored=12, WindowCenter=[1536, 500], WindowWidth=[1024, 100],
                      VOILUTFunction="SIGMOID")
    img = read_image(save(ds, tmp_path / "sig.dcm"))
    expect = 1 / (1 + np.exp(-4 * (RAMP - 1536.0) / 1024))  # first preset is the default
    np.testing.assert_allclose(img.pixels, expect, atol=1e-6)
    img2 = read_image(save(make_dataset(RAMP, bits_stored=12, WindowCenter=1536, WindowWidth=1024,
                                        VOILUTFunction="LINEAR_EXACT"), tmp_path / "le.dcm"))
    np.testing.assert_allclose(img2.pixels, np.clip((RAMP - 1536.0) / 1024 + 0.5, 0, 1), atol=1e-6)


def test_voi_lut_sequence_preferred(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    lut = Dataset()
    lut.LUTDescriptor = [1024, 1000, 16]  # 1024 entries starting at stored value 1000, 16-bit output
    table = np.linspace(0, 65535, 1024).round()
    lut.add_new(0x00283006, "OW", table.astype("<u2").tobytes())  # LUTData, as writers store it
    ds = make_dataset(RAMP, bits_stored=12, WindowCenter=10, WindowWidth=20)
    ds.VOILUTSequence = Sequence([lut])
    img = read_image(save(ds, tmp_path / "lut.dcm"))
    idx = np.clip(RAMP.astype(int) - 1000, 0, 1023)
    np.testing.assert_allclose(img.pixels, table[idx] / 65535, atol=1e-6)
    assert img.meta["voi"] == "lut"
    raw = read_image(tmp_path / "lut.dcm", apply_voi=False)
    assert raw.meta["voi"] is None


def test_monochrome1_and_presentation_inverse(tmp_path: Path) -> None:
    m2 = read_image(save(make_dataset(RAMP, bits_stored=12), tmp_path / "m2.dcm")).pixels
    m1 = read_image(save(make_dataset(RAMP, bits_stored=12, photometric="MONOCHROME1"), tmp_path / "m1.dcm"))
    assert m1.meta["inverted"] and np.allclose(m1.pixels, 1 - m2, atol=1e-6)
    inv = read_image(save(make_dataset(RAMP, bits_stored=12, PresentationLUTShape="INVERSE"), tmp_path / "i.dcm"))
    assert np.allclose(inv.pixels, 1 - m2, atol=1e-6)


@pytest.mark.parametrize("encoding", ["implicit", "big_endian", "acr_nema"])
def test_vr_and_byte_order_variants(tmp_path: Path, encoding: str) -> None:
    ref = read_image(save(make_dataset(RAMP, bits_stored=12), tmp_path / "ref.dcm")).pixels
    ds = make_dataset(RAMP, bits_stored=12)
    p = tmp_path / f"{encoding}.dcm"
    if encoding == "acr_nema":
        save_acr_nema(ds, p)
        assert p.read_bytes()[128:132] != b"DICM"
    else:
        save(ds, p, implicit=encoding == "implicit", big_endian=encoding == "big_endian")
    img = read_image(p)
    assert np.array_equal(img.pixels, ref)
    assert img.meta["has_file_meta"] == (encoding != "acr_nema")


def test_jpeg_lossless_roundtrip_real_pixels(tmp_path: Path, rg1_crop: np.ndarray) -> None:
    ds = make_dataset(rg1_crop, bits_stored=15)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([encode_jpeg_lossless(rg1_crop, precision=16)])
    pydicom.dcmwrite(tmp_path / "jll.dcm", ds)
    ref = read_image(save(make_dataset(rg1_crop, bits_stored=15), tmp_path / "ref.dcm"))
    img = read_image(tmp_path / "jll.dcm")
    assert img.meta["transfer_syntax"] == str(JPEGLosslessSV1)
    assert np.array_equal(img.pixels, ref.pixels)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
def test_lossless_codecs_roundtrip_real_pixels(tmp_path: Path, rg1_crop: np.ndarray, syntax: str) -> None:
    ref = read_image(save(make_dataset(rg1_crop, bits_stored=15), tmp_path / "ref.dcm"))
    ds = make_dataset(rg1_crop, bits_stored=15)
    ds.compress(syntax)
    pydicom.dcmwrite(tmp_path / "c.dcm", ds)
    img = read_image(tmp_path / "c.dcm")
    assert img.meta["transfer_syntax"] == str(syntax)
    assert np.array_equal(img.pixels, ref.pixels)


def test_multiframe_and_colour_are_refused(tmp_path: Path) -> None:
    frames = np.stack([RAMP, RAMP])
    ds = make_dataset(RAMP, bits_stored=12)
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    with pytest.raises(CXRReadError, match="multi-frame"):
        read_image(save(ds, tmp_path / "mf.dcm"))
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0] = 200  # red
    p = save(make_dataset(rgb, photometric="RGB"), tmp_path / "rgb.dcm")
    with pytest.raises(CXRReadError, match="colour DICOM") as e:
        read_image(p)
    assert str(p) in str(e.value)
    rgb[:16, :, 1] = 100  # top half orange: its luma is higher, so it must come out brighter
    lum = read_image(save(make_dataset(rgb, photometric="RGB"), tmp_path / "rgb2.dcm"), color="luminance")
    assert lum.pixels.shape == (32, 48)
    assert lum.pixels[:16].min() > lum.pixels[16:].max()


def test_no_pixel_data_and_bad_header(tmp_path: Path) -> None:
    ds = make_dataset(RAMP, bits_stored=12)
    del ds.PixelData
    with pytest.raises(CXRReadError, match="no pixel data"):
        read_image(save(ds, tmp_path / "np.dcm"))
    ds = make_dataset(RAMP, bits_stored=12)
    ds.Rows = 4000  # header disagrees with the pixel data length
    with pytest.raises(CXRReadError):
        read_image(save(ds, tmp_path / "rows.dcm"))
