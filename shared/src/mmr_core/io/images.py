"""The repository's one image reader: any file PIL opens becomes an 8-bit RGB image, by documented rules.

Every package reads user images through :func:`read_image` (or converts an already opened PIL image with
:func:`to_rgb`), so that a 16-bit scan, a palette PNG or a CMYK JPEG gives the same pixels everywhere.

Mode rules (PIL mode of the file -> what the 8-bit RGB pixels are):

==================================  =====================================================================
``RGB``                             unchanged (the official pipelines' ``convert("RGB")`` is a no-op too)
``L``, ``1``                        the grey level replicated to three channels (``1``: 0 or 255)
``P`` (palette)                     looked up in its palette; a transparent palette goes through RGBA first
``LA``, ``RGBA``, ``PA``, ``La``    alpha dropped, not composited: a transparent pixel keeps its stored
                                    colour (what ``convert("RGB")`` in the official code gives)
``CMYK``, ``YCbCr``, ``LAB``,       PIL's own conversion (CMYK: the naive one; an embedded ICC profile
``HSV``                             is not applied)
``I;16``, ``I;16B``, ``I;16L``      16-bit grey scaled by the type's range: ``round(v / 65535 * 255)``, so
                                    a 0..65535 ramp spans 0..255 (PIL's own conversion clips at 255)
``I`` (32-bit signed)               values inside 0..65535 (how older PIL opened 16-bit PNGs) as 16-bit;
                                    any other range stretched from its minimum..maximum to 0..255
``F`` (32-bit float)                values inside [0, 1] as ``round(v * 255)``; any other range stretched
                                    from its minimum..maximum to 0..255; NaN or infinity is an error
==================================  =====================================================================

A constant image whose range must be stretched becomes black. Multi-frame files (TIFF stacks, GIFs) give
their first frame. EXIF orientation is applied by default (``exif_orientation=True``): a phone photo
stored sideways comes out upright; pass ``False`` where annotations refer to the stored pixel grid (the
official GLIP / COCO loaders do not rotate). 48-bit RGB files are reduced to 8 bits per channel by PIL
itself when they are opened.

A file that cannot be read (missing, empty, truncated, not an image, a decompression bomb) raises
:class:`ImageReadError` naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["ImageReadError", "read_image", "to_rgb"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageReadError(ValueError):
    """An image file could not be read or holds values no RGB image can be made from.

    Attributes:
        source: The file (or ``"<bytes>"``) that failed.
        reason: What is wrong with it.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: image: {reason}, expected an image file PIL can read")
        self.source, self.reason = source, reason


def _grey_to_rgb(levels: np.ndarray):
    """A float array of 0..255 grey levels as an RGB PIL image (rounded to the nearest level)."""
    from PIL import Image

    grey = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def _stretch(values: np.ndarray) -> np.ndarray:
    """Values mapped linearly from their minimum..maximum to 0..255 (a constant image becomes 0)."""
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def to_rgb(img, source: str = "<image>"):
    """Convert a PIL image of any mode to 8-bit RGB by the rules in this module's docstring.

    Args:
        img: A loaded PIL image.
        source: Name used in errors (the file the image came from).

    Returns:
        A PIL image in mode ``RGB`` (``img`` itself when it already is RGB).

    Raises:
        ImageReadError: A float image holds NaN or infinity, or the mode cannot be converted.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        # float64 keeps every 16-bit level exact; v / 257 == v / 65535 * 255 and never lands on a .5 tie
        return _grey_to_rgb(np.asarray(img, dtype=np.float64) / 257.0)
    if mode == "I":
        values = np.asarray(img, dtype=np.float64)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _grey_to_rgb(values / 257.0)
        return _grey_to_rgb(_stretch(values))
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise ImageReadError(source, f"float image has {bad} NaN or infinite pixels")
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            return _grey_to_rgb(values * 255.0)
        return _grey_to_rgb(_stretch(values))
    if mode in ("P", "PA") and ("transparency" in img.info or mode == "PA"):
        img = img.convert("RGBA")  # PIL warns when converting a transparent palette straight to RGB
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageReadError(source, f"mode {mode} cannot be converted to RGB ({e})") from e


def read_image(source: str | Path | bytes | BinaryIO, exif_orientation: bool = True):
    """Read an image file fully and return it as an 8-bit RGB PIL image.

    Args:
        source: A path, the encoded bytes, or an open binary file.
        exif_orientation: Apply the EXIF orientation tag (see the module docstring for when not to).

    Returns:
        A loaded PIL image in mode ``RGB``, independent of the file (which is closed).

    Raises:
        ImageReadError: The file is missing, empty, truncated, not an image, too large for PIL's
            decompression-bomb limit, or holds non-finite float pixels.
    """
    from PIL import Image, ImageOps

    if isinstance(source, bytes | bytearray):
        name, opened = "<bytes>", io.BytesIO(source)
    elif isinstance(source, str | Path):
        name, opened = str(source), source
        if not Path(source).is_file():
            raise ImageReadError(name, "file does not exist")
    else:
        name, opened = str(getattr(source, "name", "<file>")), source
    try:
        with Image.open(opened) as img:
            img.load()  # decode everything now, so a truncated file fails here and not in a transform
            if exif_orientation:
                img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img, name)
            return rgb.copy() if rgb is img else rgb
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError (empty / not an image) and "image file is truncated" are OSErrors
        raise ImageReadError(name, f"{type(e).__name__}: {e}") from e
