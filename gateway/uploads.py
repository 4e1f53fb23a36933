"""Early checks of an uploaded image, from its header only: the worker does the full decode."""

from __future__ import annotations

from gateway.errors import ApiError
from workers.errors import ImageRejected
from workers.imagefile import Header, header

# HTTP status of each reason code of workers.imagefile.
STATUS = {"empty": 400, "not_an_image": 400, "corrupt": 400, "truncated": 400, "too_large": 413,
          "unsupported_format": 415, "too_many_pixels": 422, "too_small": 422}


def check_image(data: bytes, max_bytes: int, max_pixels: int) -> Header:
    """Refuse what can never be searched before it is stored or queued: the worker's own header
    checks (:func:`workers.imagefile.header`, Pillow alone), so both refuse the same files for the
    same reason. The format is read from the content, never from the file name: a PNG named
    ``.jpg`` is accepted as the PNG it is.

    Args:
        data: The uploaded file.
        max_bytes: LOOKALIKE_MAX_UPLOAD_BYTES.
        max_pixels: LOOKALIKE_MAX_PIXELS.

    Returns:
        What the header says: format, mode, EXIF orientation, width and height as stored.

    Raises:
        ApiError: 400 ``empty``, ``not_an_image``, ``corrupt`` (a header that cannot be read) or
            ``truncated``; 413 ``too_large``; 415 ``unsupported_format`` (PDF and SVG included);
            422 ``too_many_pixels`` or ``too_small``. Pixel data that is cut short or corrupt is the
            worker's to find: the job then fails with the same codes.
    """
    try:
        return header(data, max_pixels, max_bytes)
    except ImageRejected as exc:
        raise ApiError(STATUS[exc.code], exc.code, exc.message, "image") from None
