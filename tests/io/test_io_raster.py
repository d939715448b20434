"""PNG / JPEG and friends: bit depths, grayscale-in-RGB, colour policy, bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chexfound.errors import CXRReadError
from chexfound.io import MIN_SIZE, read_image, read_image_bytes


def _nih_png(data_root: Path) -> Path:
    return sorted((data_root / "nih14" / "images").glob("*.png"))[0]


def test_png_8bit_values_kept(data_root: Path) -> None:
    p = _nih_png(data_root)
    img = read_image(p)
    raw = np.asarray(Image.open(p))
    assert img.meta["source_format"] == "PNG" and img.meta["bit_depth"] == 8
    np.testing.assert_array_equal(img.to_uint8(), raw)
    assert img.meta["original_size"] == list(raw.shape)


def test_png_16bit_rescaled_by_real_range_not_clipped(tmp_path: Path, data_root: Path) -> None:
    # A real radiograph stored as 12-bit data in a 16-bit PNG (as PadChest does).
    base = np.asarray(Image.open(_nih_png(data_root))).astype(np.uint16)
    arr = (base * 16 + 7).astype(np.uint16)  # 7..4087: well above 255, well below 65535
    Image.fromarray(arr).save(tmp_path / "d16.png")
    img = read_image(tmp_path / "d16.png")
    assert img.meta["bit_depth"] == 16 and img.meta["value_range"] == [float(arr.min()), float(arr.max())]
    assert img.pixels.min() == 0.0 and img.pixels.max() == 1.0
    np.testing.assert_allclose(img.pixels, (arr - arr.min()) / np.ptp(arr).astype(np.float64), atol=1e-6)
    # Unlike PIL's convert("L"), which clips everything above 255 to white:
    clipped = np.asarray(Image.open(tmp_path / "d16.png").convert("L"))
    assert (clipped == 255).mean() > 0.9 and (img.pixels > 0.99).mean() < 0.1


def test_rgb_and_rgba_holding_grayscale(tmp_path: Path, data_root: Path) -> None:
    grey = np.asarray(Image.open(_nih_png(data_root)))
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)])).save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        img = read_image(tmp_path / name)
        np.testing.assert_array_equal(img.to_uint8(), grey)


def test_real_rgb_files_of_the_shared_sets(data_root: Path) -> None:
    kermany = sorted((data_root / "kermany" / "dataset" / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    tiny = sorted((data_root / "nih14-tiny64" / "train").glob("*/*.png"))[0]
    k = read_image(kermany)
    assert k.meta["source_format"] == "JPEG" and k.shape == (224, 224) and k.pixels.std() > 0.05
    t = read_image(tiny)
    assert t.shape == (64, 64) and t.meta["converted_from"] == "RGB"


def test_grayscale_jpeg_with_chroma_noise_is_accepted(tmp_path: Path, data_root: Path) -> None:
    grey = np.asarray(Image.open(_nih_png(data_root)))
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "g.jpg", quality=70, subsampling=2)
    img = read_image(tmp_path / "g.jpg")
    assert np.abs(img.pixels * 255 - grey).mean() < 4


def test_colour_image_refused_or_converted(tmp_path: Path) -> None:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:32, :, 0] = 255  # red top, blue bottom
    rgb[32:, :, 2] = 255
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(CXRReadError, match="colour") as e:
        read_image(tmp_path / "colour.png")
    assert "colour.png" in str(e.value)
    lum = read_image(tmp_path / "colour.png", color="luminance")
    np.testing.assert_allclose(lum.pixels[0, 0], 0.299, atol=1e-3)
    np.testing.assert_allclose(lum.pixels[-1, 0], 0.114, atol=1e-3)


def test_palette_and_16bit_tiff(tmp_path: Path) -> None:
    g = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    Image.fromarray(g).convert("P").save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png").to_uint8(), g)
    a16 = (np.arange(64 * 64).reshape(64, 64) * 3).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "t.tif")
    t = read_image(tmp_path / "t.tif")
    assert t.meta["bit_depth"] == 16 and t.pixels.max() == 1.0 and t.pixels.min() == 0.0


def test_bytes_api_matches_path_api(data_root: Path) -> None:
    p = _nih_png(data_root)
    a = read_image(p)
    b = read_image_bytes(p.read_bytes(), "upload.png")
    assert np.array_equal(a.pixels, b.pixels) and b.meta["path"] == "upload.png"


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"hello, this is a text file and not an X-ray\n" * 20, "not a recognised image format"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a readable image|corrupt"),
    ],
)
def test_bad_files_name_file_and_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(CXRReadError, match=reason) as e:
        read_image(p)
    assert e.value.path == str(p) and str(p) in str(e.value)


def test_truncated_png_and_jpeg(tmp_path: Path, data_root: Path) -> None:
    png = _nih_png(data_root).read_bytes()
    jpg = sorted((data_root / "kermany" / "dataset" / "test" / "NORMAL").glob("*.jpeg"))[0].read_bytes()
    for name, data in (("t.png", png[: len(png) // 2]), ("t.jpg", jpg[: len(jpg) // 2])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CXRReadError, match="truncated|corrupt|not a readable"):
            read_image(tmp_path / name)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CXRReadError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(CXRReadError, match="not a regular file"):
        read_image(tmp_path)


def test_min_size(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((MIN_SIZE - 1, 300), np.uint8)).save(tmp_path / "thin.png")
    with pytest.raises(CXRReadError, match="smaller than the minimum"):
        read_image(tmp_path / "thin.png")
    assert read_image(tmp_path / "thin.png", min_size=None).shape == (MIN_SIZE - 1, 300)
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "sq.png")
    with pytest.raises(CXRReadError, match="100x100"):
        read_image(tmp_path / "sq.png", min_size=224)


def test_multiframe_raster_refused(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((64, 64), v, np.uint8)) for v in (0, 128)]
    frames[0].save(tmp_path / "two.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(CXRReadError, match="multi-frame"):
        read_image(tmp_path / "two.tif")


def test_exif_orientation_applied(tmp_path: Path) -> None:
    a = np.zeros((40, 80), np.uint8)
    a[:, :40] = 255  # left half white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW for display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    img = read_image_bytes(buf.getvalue(), "rot.jpg")
    assert img.shape == (80, 40) and img.pixels[:30].mean() > 0.9 and img.pixels[50:].mean() < 0.1
