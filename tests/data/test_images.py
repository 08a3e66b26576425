"""read_image / image_size on files written here with known pixel values."""

import numpy as np
import pytest
from PIL import Image, ImageFile

from sadpipe.data.images import ImageReadError, image_size, read_image


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def test_rgb_png_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    path = _save(Image.fromarray(pixels), tmp_path / "rgb.png")
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (7, 11, 3)
    np.testing.assert_array_equal(out, pixels)
    assert image_size(path) == (7, 11)


def test_cmyk_jpeg_matches_pillow_conversion(tmp_path):
    # C=0, M=255, Y=255, K=0 is pure red in Pillow's naive CMYK->RGB (R = 255 - C - K, ...)
    path = _save(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100)
    with Image.open(path) as reference:
        assert reference.mode == "CMYK"
        expected = np.asarray(reference.convert("RGB"))
    out = read_image(path)
    assert out.shape == (8, 16, 3)
    np.testing.assert_array_equal(out, expected)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 3


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    # stored 20 high x 40 wide with a white 6x6 block in the stored top-left corner.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:6, :6] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored top-left lands top-right
    path = _save(Image.fromarray(stored), tmp_path / "rot.jpg", exif=exif, quality=100)
    out = read_image(path)
    assert out.shape == (40, 20, 3)  # axes swapped
    assert image_size(path) == (40, 20)
    assert out[:5, -5:].min() > 200  # marked corner now top-right
    assert out[:5, :5].max() < 50 and out[-5:, -5:].max() < 50
    # independent check: numpy clockwise rotation of the stored pixels (JPEG tolerance)
    expected = np.rot90(stored, k=-1)
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 3


def test_grayscale_and_bilevel(tmp_path):
    gray = np.array([[0, 10, 200], [255, 128, 7]], np.uint8)
    out = read_image(_save(Image.fromarray(gray, "L"), tmp_path / "g.png"))
    np.testing.assert_array_equal(out, np.stack([gray] * 3, axis=2))

    bits = np.array([[True, False], [False, True]])
    out = read_image(_save(Image.fromarray(bits), tmp_path / "b.png"))
    np.testing.assert_array_equal(out[..., 0], [[255, 0], [0, 255]])
    assert (out[..., 0] == out[..., 2]).all()


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32768, 0, 257]], np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "d16.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really a 16-bit file
    out = read_image(path)
    assert out.dtype == np.uint8
    # 65535 -> 255; 32768*255/65535 = 127.502 -> 128; 257*255/65535 = 1
    assert out[0, 0, 0] == 255
    assert abs(int(out[0, 1, 0]) - 128) <= 1
    assert out[0, 2, 0] == 0 and out[0, 3, 0] == 1
    assert (out[..., 0] == out[..., 1]).all()


def test_rgba_composited_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 128], [10, 20, 30, 255], [255, 255, 255, 0]]], np.uint8)
    out = read_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    # 200*128/255 = 100.39 -> 100, 100*128/255 = 50.2 -> 50, 50*128/255 = 25.1 -> 25
    np.testing.assert_array_equal(out[0, 0], [100, 50, 25])
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
    np.testing.assert_array_equal(out[0, 2], [0, 0, 0])


def test_la_composited_on_black(tmp_path):
    la = np.array([[[200, 255], [200, 0]]], np.uint8)
    out = read_image(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    np.testing.assert_array_equal(out[0], [[200, 200, 200], [0, 0, 0]])


def test_palette_with_and_without_transparency(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    out = read_image(_save(img, tmp_path / "p.png"))
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])

    out = read_image(_save(img, tmp_path / "pt.png", transparency=1))  # green fully transparent
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 0, 0], [0, 0, 255]])


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_truncated_file_raises_with_path(tmp_path, fmt):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)  # noise: no tiny encodings
    full = _save(Image.fromarray(pixels), tmp_path / f"full.{fmt}")
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageReadError, match="truncated") as info:
        read_image(cut)
    assert str(cut) in str(info.value)
    assert image_size(cut) == (64, 64)  # header-only read does not notice truncation


def test_empty_text_missing_files(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    missing = tmp_path / "missing.jpg"
    for path, problem in [(empty, "empty"), (text, "not a readable image"), (missing, "does not exist")]:
        for reader in (read_image, image_size):
            with pytest.raises(ImageReadError, match=problem) as info:
                reader(path)
            assert str(path) in str(info.value)
            assert isinstance(info.value, ValueError)


def test_refuses_when_truncated_loading_enabled(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "ok.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        read_image(path)
