"""The inputs of ``bss-separate``: a user's images read, checked and turned into mixtures to separate.

Each is one mixture ``x = (digit + fashion) / 2`` with light shapes on black: PNG, JPEG or BMP through
Pillow, or a 2-D ``.npy``, as float32 [H, W] in [0, 1]. A file the command cannot use raises
``InputError`` with one line naming the file and the fix; a usable but unusual one gets a notice.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bss_model.errors import BssError, one_line

# The largest image accepted, in pixels (2048x2048). The net is fully convolutional, so memory grows with
# the pixel count: the seed U-Net keeps ~350 float32 channels alive at full resolution, ~1.4 KB per pixel,
# so 4 Mpx already needs ~6 GB. A model trained on 32x32 tiles gains nothing from larger inputs anyway.
MAX_PIXELS = 2048 * 2048
FORMATS = ("PNG", "JPEG", "BMP")
# Pillow modes read as grayscale without a notice, and those converted with one.
_GRAY_MODES = ("L", "1")
_COLOUR_MODES = ("RGB", "RGBA", "LA", "P", "CMYK", "YCbCr")

_FIX_IMAGE = "pass a PNG, JPEG or BMP image, or a 2-D .npy array (uint8 0-255 or float in [0, 1])"


class InputError(BssError):
    """An input image the command cannot use; the message names the file and the fix."""


@dataclass
class Item:
    """One mixture to separate. ``name`` is what messages and ``--json`` call it (the path as given)."""

    name: str
    stem: str
    image: np.ndarray  # float32 [H, W] in [0, 1]
    truth: tuple[np.ndarray, np.ndarray] | None = None  # (digit, fashion), float32 [H, W], for --demo
    notices: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Reading inputs


def _too_large(name: str, h: int, w: int) -> InputError:
    side = int(math.isqrt(MAX_PIXELS))
    return InputError(
        f"{name} is {w}x{h} = {w * h:,} pixels, more than the {MAX_PIXELS:,} ({side}x{side}) this command accepts: "
        "crop or downscale it (the model was trained on 32x32)"
    )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path} does not exist: check the path")
    if not path.is_file():
        raise InputError(f"{path} is not a file: {_FIX_IMAGE}")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes): {_FIX_IMAGE}")


def read_npy(path: Path) -> np.ndarray:
    """A 2-D ``.npy`` as float32 [H, W] in [0, 1]: uint8 (or any integer type) 0-255 is divided by 255,
    floats must already be in [0, 1]. The header is checked before any data is read, so a huge or
    3-D array is refused without loading it."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            # Version 3.0 differs from 2.0 only in allowing utf-8 field names, which plain arrays never have.
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise InputError(f"{path} is not a readable .npy file ({one_line(exc)}): save it with numpy.save") from None
    if len(shape) != 2:
        dims = "x".join(map(str, shape)) or "scalar"
        raise InputError(
            f"{path} holds a {len(shape)}-D array ({dims}): save one 2-D [H, W] grayscale image per file "
            "(e.g. numpy.save(path, array.squeeze()) or one file per image)"
        )
    h, w = shape
    if h == 0 or w == 0:
        raise InputError(f"{path} holds an empty {h}x{w} array: save a non-empty [H, W] image")
    if h * w > MAX_PIXELS:
        raise _too_large(str(path), h, w)
    is_int = np.issubdtype(dtype, np.integer) and dtype != np.bool_
    if not (is_int or np.issubdtype(dtype, np.floating)):
        raise InputError(f"{path} holds {dtype} values: save uint8 (0-255) or float (0-1) pixels")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path} is a truncated or corrupt .npy file ({one_line(exc)}): save it again") from None
    if is_int:
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise InputError(
                f"{path} holds integer pixels in [{lo}, {hi}], outside 0-255: save uint8 pixels (0-255) "
                "or floats in [0, 1]"
            )
        return (array.astype(np.float32) / 255).astype(np.float32)
    array = array.astype(np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        raise InputError(f"{path} holds {int(bad.sum())} NaN or infinite values: replace them (e.g. numpy.nan_to_num)")
    lo, hi = float(array.min()), float(array.max())
    if lo < 0 or hi > 1:
        raise InputError(
            f"{path} holds float pixels in [{lo:g}, {hi:g}], outside [0, 1]: rescale them (floats are read as "
            "0 = black, 1 = white) or save uint8 0-255"
        )
    return array.astype(np.float32)


def read_picture(path: Path) -> tuple[np.ndarray, list[str]]:
    """A PNG, JPEG or BMP as float32 [H, W] in [0, 1], and the notices it earned (colour converted)."""
    from PIL import Image, ImageOps

    notices: list[str] = []
    try:
        # Pillow refuses images over 2 * MAX_IMAGE_PIXELS from the header alone (a decompression bomb):
        # tie its limit to ours so a bomb never gets as far as decoding. Its warning band between 1x and 2x
        # is covered by our own size check below, also made before decoding.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_PIXELS
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = before
    except Image.DecompressionBombError:
        raise InputError(
            f"{path} declares more than {2 * MAX_PIXELS:,} pixels (a decompression bomb?): "
            f"crop or downscale it to at most {MAX_PIXELS:,} pixels"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise InputError(f"{path} is not an image Pillow can read ({one_line(exc)}): {_FIX_IMAGE}") from None
    with im:
        if im.format not in FORMATS:
            raise InputError(f"{path} is a {im.format} image: convert it to PNG (or JPEG/BMP) or .npy")
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise _too_large(str(path), h, w)
        if getattr(im, "n_frames", 1) > 1:
            notices.append(f"{path} has {im.n_frames} frames: only the first is used")
        try:
            im.load()  # decodes now: a truncated or damaged file fails here, not halfway through writing
            mode = im.mode
            im = ImageOps.exif_transpose(im)  # a camera's JPEG: the pixels as the photo is meant to be seen
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InputError(
                f"{path} is a truncated or damaged {im.format} ({one_line(exc)}): re-export or re-download it"
            ) from None
        if mode in _GRAY_MODES:
            gray = im.convert("L")
        elif mode in _COLOUR_MODES:
            # ITU-R 601-2 luma (Pillow's convert("L")); alpha is dropped, as the training images have none.
            alpha = " (alpha dropped)" if "A" in mode or "transparency" in im.info else ""
            notices.append(f"{path} is {mode}: converted to grayscale{alpha}")
            gray = im.convert("L")
        else:  # 16-bit or float grayscale ("I;16", "I", "F"): ambiguous scale, so ask for 8 bits
            raise InputError(f"{path} has Pillow mode {mode}: save it as 8-bit grayscale or RGB")
        return np.asarray(gray, dtype=np.float32) / 255, notices


def read_input(path_arg: str) -> Item:
    path = Path(path_arg)
    _check_file(path)
    if path.suffix.lower() == ".npy":
        image, notices = read_npy(path), []
    else:
        image, notices = read_picture(path)
    # MNIST and Fashion-MNIST are light shapes on black: a mostly light picture is likely inverted.
    if image.mean() > 0.6:
        notices.append(
            f"{path} is mostly light (mean {image.mean():.2f}): the model was trained on light shapes on black; "
            "if separations look wrong, invert it (255 - pixels)"
        )
    return Item(name=path_arg, stem=path.stem, image=image, notices=notices)
