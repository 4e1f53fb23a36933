"""Early checks of an uploaded image, from its header only: the worker does the full decode."""

from __future__ import annotations

import io
import warnings

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
        ApiError: 413 too large; 400 empty or not an image; 415 a format that is not supported
            (PDF and SVG included); 422 too many pixels. The format is read from the content, never
            from the file name: a PNG named ``.jpg`` is accepted as the PNG it is.
    """
    if len(data) > max_bytes:
        raise ApiError(413, "too_large", f"the image is {len(data)} bytes, more than the {max_bytes}-byte limit "
                       "(LOOKALIKE_MAX_UPLOAD_BYTES); send a smaller file", "image")
    if not data:
        raise ApiError(400, "empty", "the image file is empty (0 bytes)", "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
    except Image.DecompressionBombError as exc:  # a header declaring over twice Pillow's own limit
        raise ApiError(422, "too_many_pixels", f"the image declares too many pixels ({exc}); "
                       "send a smaller photo (LOOKALIKE_MAX_PIXELS)", "image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"%PDF-") or b"<svg" in head:  # as workers.decode.sniff_document
            raise ApiError(415, "unsupported_format", "PDF and SVG files are documents, not photos; export the "
                           f"picture as one of {', '.join(FORMATS)}", "image") from None
        raise ApiError(400, "not_an_image", "the uploaded file is not an image Lookalike can read; "
                       f"send one of {', '.join(FORMATS)}", "image") from None
    if fmt not in FORMATS:
        raise ApiError(415, "unsupported_format", f"{fmt} images are not supported; send one of "
                       f"{', '.join(FORMATS)}", "image")
    if width * height > max_pixels:
        raise ApiError(422, "too_many_pixels", f"the image is {width}x{height} px, more than the "
                       f"{max_pixels}-pixel limit (LOOKALIKE_MAX_PIXELS)", "image")
    return fmt, width, height
