"""The one image reader: every PIL mode gives the documented 8-bit RGB pixels; unreadable files name the file.

Expected pixels are computed independently with numpy from the values written, so every assertion is
exact (integer levels, no tolerance needed).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from mmr_core.io import ImageReadError, read_image, to_rgb

RAMP16 = np.linspace(0, 60000, 32 * 48).round().astype(np.uint16).reshape(32, 48)  # the 0..60000 ramp


def _grey(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_sixteen_bit_grey_scaled_by_the_type_range_not_clipped(tmp_path, suffix):
    path = tmp_path / f"ramp16.{suffix}"
    Image.fromarray(RAMP16).save(path)
    assert Image.open(path).mode.startswith("I;16")
    grey = _grey(read_image(path))
    # PIL's own convert("RGB") clipped this ramp to 99.6 % white; here every level is v * 255 / 65535
    np.testing.assert_array_equal(grey, np.rint(RAMP16 / 257.0).astype(np.uint8))
    assert grey.max() == round(60000 / 257) and (grey == 255).mean() < 0.01


def test_big_endian_sixteen_bit_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "be.tif"
    tifffile.imwrite(path, RAMP16.astype(">u2"))
    assert Image.open(path).mode == "I;16B"
    np.testing.assert_array_equal(_grey(read_image(path)), np.rint(RAMP16 / 257.0).astype(np.uint8))


def test_float_tiff_in_unit_range_kept_and_other_ranges_stretched(tmp_path):
    unit = np.linspace(0, 1, 32 * 48, dtype=np.float32).reshape(32, 48)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    # float32 -> float64 is exact, so rint(v * 255) here is exactly what the reader computes
    np.testing.assert_array_equal(_grey(read_image(tmp_path / "unit.tif")),
                                  np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    hu = (unit * 4096 - 1024).astype(np.float32)  # CT-like Hounsfield units
    Image.fromarray(hu).save(tmp_path / "hu.tif")
    grey = _grey(read_image(tmp_path / "hu.tif"))
    assert grey.min() == 0 and grey.max() == 255 and grey[0, 0] == 0


def test_float_image_with_nan_is_an_error_naming_the_file(tmp_path):
    arr = np.zeros((4, 4), np.float32)
    arr[1, 2] = np.nan
    Image.fromarray(arr).save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match=r"nan\.tif: image: float image has 1 NaN or infinite pixels"):
        read_image(tmp_path / "nan.tif")


def test_int32_images_in_and_out_of_the_sixteen_bit_range():
    inside = Image.fromarray(RAMP16.astype(np.int32))
    assert inside.mode == "I"
    np.testing.assert_array_equal(_grey(to_rgb(inside)), np.rint(RAMP16 / 257.0).astype(np.uint8))
    signed = Image.fromarray(RAMP16.astype(np.int32) - 1000)
    grey = _grey(to_rgb(signed))
    assert grey.min() == 0 and grey.max() == 255
    assert (_grey(to_rgb(Image.fromarray(np.full((3, 3), -7, np.int32)))) == 0).all()  # constant: black


def test_palette_alpha_grey_cmyk_and_bilevel():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    np.testing.assert_array_equal(np.asarray(to_rgb(rgba)), rgb)  # alpha dropped, colours kept
    grey = rgb[..., 0]
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(np.dstack([grey, alpha]), "LA")))[..., 1], grey)
    np.testing.assert_array_equal(_grey(to_rgb(Image.fromarray(grey, "L"))), grey)

    palette = Image.fromarray(rgb).quantize(16)
    lut = np.asarray(palette.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(np.asarray(to_rgb(palette)), lut[np.asarray(palette)])
    palette.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns on a transparent palette converted straight to RGB
        np.testing.assert_array_equal(np.asarray(to_rgb(palette)), lut[np.asarray(palette)])

    cmyk = Image.fromarray(rgb).convert("CMYK")
    np.testing.assert_array_equal(np.asarray(to_rgb(cmyk)), np.asarray(cmyk.convert("RGB")))
    bilevel = Image.fromarray(grey > 127)
    assert bilevel.mode == "1"
    np.testing.assert_array_equal(_grey(to_rgb(bilevel)), np.where(grey > 127, 255, 0))


def test_exif_orientation_applied_unless_turned_off(tmp_path):
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / "rotated.png"
    img.save(path, exif=exif)
    upright = np.asarray(read_image(path))
    np.testing.assert_array_equal(upright, np.rot90(arr, k=-1))
    np.testing.assert_array_equal(np.asarray(read_image(path, exif_orientation=False)), arr)


def test_bytes_and_file_objects(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(RAMP16).save(buf, format="PNG")
    from_bytes = np.asarray(read_image(buf.getvalue()))
    buf.seek(0)
    np.testing.assert_array_equal(np.asarray(read_image(buf)), from_bytes)


def test_unreadable_files_name_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name, why in [("cut.jpg", "Truncated"), ("empty.png", "cannot identify"), ("text.png", "cannot identify"),
                      ("missing.png", "file does not exist")]:
        with pytest.raises(ImageReadError, match=rf"{name}: image: .*{why}") as info:
            read_image(tmp_path / name)
        assert info.value.source == str(tmp_path / name)
