"""Early checks of an uploaded image, from its header only: the worker does the full decode."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from gateway.errors import ApiError

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def check_image(data: bytes, max_bytes: int, max_pixels: int) -> tuple[str, int, int]:
    """Refuse what can never be searched before it is stored or queued.

    Args:
        data: The uploaded file.
        max_bytes: LOOKALIKE_MAX_UPLOAD_BYTES.
        max_pixels: LOOKALIKE_MAX_PIXELS.

    Returns:
        ``(format, width, height)`` read from the header.

    Raises:
        ApiError: 413 too large; 400 empty or not an image; 415 a format that is not supported;
            422 too many pixels.
    """
    if len(data) > max_bytes:
        raise ApiError(413, "too_large", f"the image is {len(data)} bytes, more than the {max_bytes}-byte limit "
                       "(LOOKALIKE_MAX_UPLOAD_BYTES); send a smaller file", "image")
    if not data:
        raise ApiError(400, "empty", "the image file is empty (0 bytes)", "image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ApiError(400, "not_an_image", "the uploaded file is not an image Lookalike can read; "
                       f"send one of {', '.join(FORMATS)}", "image") from None
    if fmt not in FORMATS:
        raise ApiError(415, "unsupported_format", f"{fmt} images are not supported; send one of "
                       f"{', '.join(FORMATS)}", "image")
    if width * height > max_pixels:
        raise ApiError(422, "too_many_pixels", f"the image is {width}x{height} px, more than the "
                       f"{max_pixels}-pixel limit (LOOKALIKE_MAX_PIXELS)", "image")
    return fmt, width, height
