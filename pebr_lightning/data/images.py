"""Images as the model should see them: opened only in the formats VLM data holds,
refused from the header when too large or too thin, upright as their EXIF orientation
says, and converted to 8-bit RGB as a viewer shows them. Manifest validation, the
collator, the rewards and the rollout engines all read images through here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from pebr_lightning.errors import ManifestError

IMAGE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)
"""What Pillow raises for a file that is not a readable image."""

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
"""Largest image decoded (width x height): 120 MB as RGB. PEBR_MAX_IMAGE_PIXELS changes
it; PEBR_RESIZE_LARGE_IMAGES=1 shrinks larger ones to it instead of refusing them."""


def max_image_pixels() -> int:
    value = os.environ.get("PEBR_MAX_IMAGE_PIXELS", "")
    return int(value) if value.strip().isdigit() else DEFAULT_MAX_IMAGE_PIXELS


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""The formats an image is opened as: what VLM data holds. Pillow would otherwise try
every plugin it has, EPS among them, which runs Ghostscript on the file."""

MAX_ASPECT_RATIO = 200
"""Qwen-VL's image processor refuses a longer side over 200x the shorter one."""


def open_image(source: Any) -> Image.Image:
    """`Image.open` limited to IMAGE_FORMATS (a path or a binary file)."""
    return Image.open(source, formats=IMAGE_FORMATS)


def image_problem(path: str | Path, image: Image.Image, limit: int | None = None) -> str | None:
    """What is wrong with an opened (not yet decoded) image, from its header alone:
    too long and thin for the processor, or more memory decoded than the limit allows."""
    width, height = image.size
    if min(width, height) < 1:
        return f"image {path} is {width} x {height}: empty"
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        return (
            f"image {path} is {width} x {height}: its aspect ratio is over "
            f"{MAX_ASPECT_RATIO}, which the Qwen-VL processor refuses; crop or pad it"
        )
    limit = max_image_pixels() if limit is None else limit
    if decoded_pixels(image) > limit:
        return oversized(path, image, limit)
    return None


def decoded_pixels(image: Image.Image) -> int:
    """Pixels of the image weighted by memory: decoding and converting a mode wider
    than 8-bit RGB (16/32-bit, float, CMYK) costs more per pixel, so the pixel limit
    (set for RGB, 3 bytes a pixel) counts such images as larger."""
    return image.width * image.height * max(3, _bytes_per_pixel(image.mode)) // 3


def _bytes_per_pixel(mode: str) -> int:
    from PIL import ImageMode

    try:
        spec = ImageMode.getmode(mode)
    except KeyError:
        return 4
    item = int(spec.typestr[-1]) if spec.typestr[-1].isdigit() else 1
    return max(1, item * len(spec.bands))


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, upright as its EXIF orientation says; an unreadable,
    oversized or too thin file raises ManifestError naming it.

    The size is read from the header before any pixel is decoded: a 10000 x 10000 PNG
    would take 0.9 GB per load. Over `max_image_pixels()` it is refused, or shrunk to
    it (aspect kept) with PEBR_RESIZE_LARGE_IMAGES=1; JPEGs shrink while decoding.
    A phone photo stored sideways with an orientation tag is turned as every viewer
    turns it: the model should see what the person who wrote the question saw.
    """
    try:
        with open_image(path) as image:
            limit = max_image_pixels()
            problem = image_problem(path, image, limit)
            if problem is not None and not (
                decoded_pixels(image) > limit and resizing() and "aspect" not in problem
            ):
                raise ManifestError(problem)
            if problem is not None:
                scale = math.sqrt(limit / decoded_pixels(image))
                size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
                image.draft("RGB", size)  # JPEG: decode at a reduced scale already
                rgb = to_rgb(image)
                rgb.thumbnail(size)
                return upright(image, rgb)
            return upright(image, to_rgb(image))
    except IMAGE_ERRORS as err:
        raise ManifestError(f"cannot read image {path}: {err}") from None


def resizing() -> bool:
    return os.environ.get("PEBR_RESIZE_LARGE_IMAGES", "") in ("1", "true", "yes")


# EXIF orientation (tag 0x0112) -> the transposition that makes the picture upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(original: Image.Image, rgb: Image.Image) -> Image.Image:
    """`rgb` (decoded from `original`) turned as `original`'s EXIF orientation says."""
    method = _UPRIGHT.get(original.getexif().get(0x0112, 1))
    return rgb if method is None else rgb.transpose(method)


def oversized(path: str | Path, image: Image.Image, limit: int) -> str:
    return (
        f"image {path} is {image.width} x {image.height} = {image.width * image.height:,} "
        f"pixels, over the limit of {limit:,}: resize it, raise PEBR_MAX_IMAGE_PIXELS, or "
        "set PEBR_RESIZE_LARGE_IMAGES=1 to shrink such images when they are read"
    )


# 16-bit and 32-bit single-channel modes; PIL's convert("RGB") clips them to 0..255,
# which turns a 16-bit picture almost entirely white.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as a person sees the file: transparency over white, 16-bit scaled.

    - Transparency (an alpha channel, or a palette / colour-key `transparency`) is
      composited onto white, as viewers show diagrams and screenshots; a plain
      convert("RGB") drops alpha and shows the (usually black) hidden colour.
    - 16-bit pixels (0..65535) are scaled to 0..255; 32-bit integer pixels too when
      they exceed 255; float pixels within 0..1 are taken as 0..1.
    """
    if image.mode in _WIDE_MODES:
        import numpy as np

        values = np.asarray(image)  # its own dtype: 2 or 4 bytes a pixel
        top = float(values.max()) if values.size else 0.0
        if image.mode.startswith("I;16") or (image.mode == "I" and top > 255):
            scale = 255.0 / 65535.0
        elif image.mode == "F" and top <= 1.0:
            scale = 255.0
        else:
            scale = 1.0
        # Scaled in blocks of rows: one float copy of a 40 MP picture is 160 MB more.
        gray = np.empty(values.shape, dtype=np.uint8)
        for start in range(0, values.shape[0], 256):
            block = values[start : start + 256].astype(np.float32) * np.float32(scale)
            gray[start : start + 256] = np.clip(np.rint(block), 0, 255)
        del values
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_paths(record: dict[str, Any]) -> list[str]:
    """A record's images in order: its `images` list, or its one `image`."""
    images = record.get("images")
    if isinstance(images, list):
        return list(images)
    image = record.get("image")
    return [image] if isinstance(image, str) and image else []
