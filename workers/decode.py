"""Image bytes -> RGB pixels, refusing what is not a usable photo with a reason a person can act on."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from workers.errors import ImageRejected

MIN_SIDE_PX = 32
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def decode(data: bytes, max_pixels: int, max_bytes: int | None = None) -> np.ndarray:
    """Decode an image file to RGB, EXIF orientation applied, transparency composited over white.

    Args:
        data: The file's bytes (JPEG, PNG, WebP, GIF first frame, BMP or TIFF).
        max_pixels: Largest width x height accepted (decompression-bomb guard, LOOKALIKE_MAX_PIXELS).
        max_bytes: Largest file accepted, or None for no limit.

    Returns:
        uint8 array (H, W, 3), RGB.

    Raises:
        ImageRejected: with ``code`` ``empty``, ``too_large``, ``not_an_image``, ``unsupported_format``,
            ``too_many_pixels``, ``too_small`` or ``corrupt``, and a message naming the value.
    """
    if not data:
        raise ImageRejected("the image is empty (0 bytes); send the photo file's contents", "empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageRejected(f"the image is {len(data)} bytes, more than the {max_bytes}-byte limit", "too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise ImageRejected(
                    f"{image.format} images are not supported; send one of {', '.join(FORMATS)}",
                    "unsupported_format")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    f"the image is {width}x{height} px, more than the {max_pixels}-pixel limit "
                    "(LOOKALIKE_MAX_PIXELS); send a smaller photo", "too_many_pixels")
            if min(width, height) < MIN_SIDE_PX:
                raise ImageRejected(
                    f"the image is {width}x{height} px; both sides must be at least {MIN_SIDE_PX} px", "too_small")
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except UnidentifiedImageError:
        raise ImageRejected("the file is not an image Lookalike can read (unknown format); "
                            f"send one of {', '.join(FORMATS)}", "not_an_image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"the image could not be decoded ({exc}); it may be truncated or corrupt",
                            "corrupt") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
