"""Reading image and mask files, the one way every loader and the data check read them.

Each file is decoded completely, so a broken one fails here, naming itself (:class:`BadImageError`), and not as an
anonymous error inside a transform. A *truncated* file is an error: Pillow's decoder raises "image file is truncated"
when the data ends before the image is complete (unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set, which this
project never does; a test checks that nothing we import sets it). OpenCV is not used for reading: it decodes a
truncated JPEG silently (grey lower half, a warning on stderr) and applies EXIF rotation where Pillow does not.

EXIF orientation is ignored everywhere (images are read in their stored pixel order): that is what torchvision's and
timm's ImageNet loaders do (so the published recipes are reproduced), and what COCO's width/height and ADE20K's mask
files are aligned with. A rotated photo is read as stored, and its annotations still line up with it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vision_mamba.data.errors import BadImageError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MASK_MODES = ("L", "P", *SIXTEEN_BIT_MODES)
# what Pillow raises for a file it cannot decode: OSError (truncated, broken data; UnidentifiedImageError is one),
# SyntaxError (broken headers), ValueError/EOFError/struct.error (inconsistent chunks), DecompressionBombError
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def open_image(path: str | Path) -> Image.Image:
    """The fully decoded image in its own mode, or a BadImageError saying why the file cannot be used."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError.of(path, "is empty (0 bytes)")
        with Image.open(path) as img:
            img.load()
            return img
    except UnidentifiedImageError:
        raise BadImageError.of(path, "is not an image (Pillow does not recognise its format)") from None
    except DECODE_ERRORS as err:
        if "truncated" in str(err).lower():  # "image file is truncated", "Truncated File Read"
            raise BadImageError.of(path, f"is truncated ({err})") from None
        raise BadImageError.of(path, f"cannot be read ({type(err).__name__}: {err})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any mode. 16-bit (and 32-bit integer) grey keeps its 8 most significant bits: Pillow's own conversion
    clips every value above 255, turning a 16-bit photo white. A palette with transparency goes through RGBA
    (Pillow warns otherwise); alpha is dropped, as torchvision's and timm's loaders do."""
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.int64).clip(0, 0xFFFF) >> 8
        return Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def read_rgb(path: str | Path) -> Image.Image:
    """An image file as an RGB PIL image (stored pixel order), or a BadImageError naming the file."""
    return to_rgb(open_image(path))


def check_image(path: str | Path) -> None:
    """Read an image file as the loaders do, for the data check (nothing to send back between processes)."""
    read_rgb(path)


def read_mask(path: str | Path) -> np.ndarray:
    """A class-index mask file as an (H, W) integer array, or a BadImageError naming the file."""
    mask = open_image(path)
    if mask.mode not in MASK_MODES:
        raise BadImageError.of(path, f"is a {mask.mode} image, not a single-channel class-index mask",
                               fix="save it as a single-channel (L or P) PNG of class indices")
    return np.asarray(mask)
