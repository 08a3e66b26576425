"""Robust image reading: every file becomes ``uint8 [H, W, 3]`` RGB, or a clear error.

Conversions (documented because they change pixel values):

- EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so ``H, W`` are the
  displayed size. COCO's ``height``/``width`` fields describe the displayed image too.
- ``1`` (bilevel) and ``L`` (grayscale) are replicated to three channels.
- ``I;16*`` and ``I`` (16-bit PNG/TIFF) are *scaled*, not clipped: ``round(v * 255 / 65535)``,
  so 65535 -> 255 and 32768 -> 128. ``I`` values outside ``[0, 65535]`` are clipped first.
- Images with an alpha channel (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry)
  are composited **on black**: ``round(colour * alpha / 255)``. Fully transparent pixels
  therefore read as black whatever colour they hide; this keeps hidden (often garbage)
  colour out of the network input.
- ``CMYK`` (and ``YCbCr``, ``LAB``, ``HSV``, ...) use Pillow's own conversion to RGB.
  Embedded ICC profiles are ignored.
- Multi-frame files (GIF, TIFF) use their first frame.

Truncated files raise: this module never sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
(it must stay ``False``; :func:`read_image` refuses to run if someone else set it) and forces
the full decode inside the error handler.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import UserError

__all__ = ["ImageReadError", "read_image", "image_size"]

# EXIF orientations 5..8 rotate by 90 or 270 degrees, i.e. swap height and width.
_ORIENTATIONS_SWAPPING_AXES = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112


class ImageReadError(UserError, ValueError):
    """An image file could not be read; the message names the file, the problem and a fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str):
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"cannot read image {str(self.path)!r}: {problem}. {fix}")


def _open_checked(path: Path) -> Image.Image:
    """Open (header only) with clear errors for missing, empty and non-image files."""
    if not path.exists():
        raise ImageReadError(path, "file does not exist",
                             "Check the images directory and the file_name in the annotation file.")
    if path.is_dir():
        raise ImageReadError(path, "it is a directory, not a file", "Point to an image file.")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)",
                             "Re-download or re-copy the file, or remove it from the dataset.")
    try:
        return Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"image is implausibly large ({err})",
                             "Check the file; raise PIL.Image.MAX_IMAGE_PIXELS only if it is genuine.") from err
    except Exception as err:  # UnidentifiedImageError, OSError, SyntaxError from broken headers
        raise ImageReadError(path, f"not a readable image ({type(err).__name__}: {err})",
                             "Remove the file or replace it with a valid JPEG/PNG.") from err


def _exif_orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8 (1 when absent, invalid or unreadable)."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF blocks are common in the wild; they do not make the image unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_size(path: Path, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageReadError(path, f"image has zero size ({width}x{height} pixels)",
                             "Remove the file from the dataset.")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` of the displayed image (after EXIF orientation), read from the header only.

    Does not decode pixel data, so a truncated file is only detected by :func:`read_image`.
    """
    path = Path(path)
    with _open_checked(path) as img:
        width, height = img.size
        _check_size(path, width, height)
        if _exif_orientation(img) in _ORIENTATIONS_SWAPPING_AXES:
            width, height = height, width
    return int(height), int(width)


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 4]`` -> ``uint8 [H, W, 3]``: colour * alpha / 255, rounded half up."""
    colour = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    return ((colour * alpha * 2 + 255) // 510).astype(np.uint8)


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Integer array in ``[0, 65535]`` (clipped) -> uint8, ``round(v * 255 / 65535)``."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide * 255 * 2 + 65535) // (2 * 65535)).astype(np.uint8)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Decoded PIL image of any supported mode -> ``uint8 [H, W, 3]``."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        gray = _sixteen_bit_to_uint8(np.asarray(img))
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("1", "L"):
        gray = np.asarray(img.convert("L"), dtype=np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info)
    if has_alpha:
        return _composite_on_black(np.asarray(img.convert("RGBA"), dtype=np.uint8))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``uint8 [H, W, 3]`` RGB with EXIF orientation applied.

    Raises :class:`ImageReadError` (naming the file) for missing, empty, truncated,
    non-image and zero-size files; see the module docstring for mode conversions.
    """
    path = Path(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some other code); sadpipe would "
            "silently read truncated images as partly grey. Leave it False.")
    with _open_checked(path) as img:
        _check_size(path, *img.size)
        try:
            img.seek(0)
            img.load()  # force the full decode here so truncation errors are caught below
        except Exception as err:  # OSError("image file is truncated"), SyntaxError, zlib errors, ...
            raise ImageReadError(path, f"file is truncated or corrupt ({type(err).__name__}: {err})",
                                 "Re-download or re-copy the file, or remove it from the dataset.") from err
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception as err:
            warnings.warn(f"{str(path)!r}: ignoring unreadable EXIF orientation ({err})", stacklevel=2)
            oriented = img
        try:
            rgb = _to_rgb_array(oriented)
        except Exception as err:
            raise ImageReadError(path, f"unsupported pixel mode {img.mode!r} ({err})",
                                 "Convert the file to 8-bit RGB JPEG or PNG.") from err
    return np.ascontiguousarray(rgb)
