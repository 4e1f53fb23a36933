"""What an image file's header says, read by Pillow alone (no numpy, no torch): the checks that the
gateway (:mod:`gateway.uploads`, before a job is queued) and the worker and the indexer
(:mod:`workers.decode`, before any pixel is decoded) both make, so that they refuse the same files
with the same reason.

The format is read from the content, never from a file name or a declared type: a PNG named
``photo.jpg`` is decoded as the PNG it is (the gateway and the indexer only have the bytes, and a
photo whose name lies is still a photo). Only the plugins of :data:`FORMATS` ever parse a file;
Pillow's others (ICO, AVIF, PSD...) are asked only for the name of a format that is refused, and
whatever they raise on a broken file then means "not an image". SVG and PDF are documents, not
photos, and are refused as ``unsupported_format``.

Reason codes (``ImageRejected.code``):

=====================  ==============================================================
``empty``              0 bytes
``too_large``          more bytes than ``max_bytes``
``not_an_image``       no known image signature (text, HTML, random bytes)
``unsupported_format`` an image or document format other than ``FORMATS`` (SVG, PDF, ICO...)
``too_many_pixels``    width x height over ``max_pixels``, read from the header before
                       decoding (decompression bombs stop here, before any memory is used)
``too_small``          a side under ``MIN_SIDE_PX``
``truncated``          the header is fine but the pixel data stops early
``corrupt``            a header or pixel data that cannot be decoded
=====================  ==============================================================
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageFile, UnidentifiedImageError

from workers.errors import ImageRejected

MIN_SIDE_PX = 32
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# A JPEG with an MPF index of further images (a camera's large preview, a gain map): Pillow's JPEG
# plugin names it MPO; its first image, the one decoded, is the JPEG.
JPEG_FORMATS = ("JPEG", "MPO")
# File signatures of FORMATS: a file that starts like one but that Pillow cannot identify has a broken header.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, ZeroDivisionError)
ORIENTATION = 0x0112  # the EXIF tag

# Truncated files must fail, not decode to grey: Pillow's default, but a process may change it.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Header:
    """What an image file's header says, read without decoding its pixels (:func:`header`).

    Attributes:
        format: One of :data:`FORMATS`, or ``MPO`` (a JPEG, :data:`JPEG_FORMATS`).
        mode: Pillow's mode of the stored pixels (``RGB``, ``L``, ``CMYK``, ``P``...).
        orientation: A JPEG's EXIF orientation, 1-8 (1: as stored; see :func:`PIL.ImageOps.exif_transpose`),
            read with its header; 1 for other formats, whose EXIF :mod:`workers.decode` reads after
            the pixels (a PNG may carry it after them).
        width: Pixels, as stored (TIFF: after its orientation, as Pillow reports it).
        height: Likewise.
    """

    format: str
    mode: str
    orientation: int
    width: int
    height: int


def header(data: bytes, max_pixels: int, max_bytes: int | None = None) -> Header:
    """Every check of :func:`workers.decode.decode` that needs no pixel data (size in bytes,
    document, format, pixel limits, smallest side), for the gateway and for a decoder that is not
    Pillow (:mod:`workers.gpu`).

    Raises:
        ImageRejected: as :func:`workers.decode.decode` for the same reasons; ``truncated`` (but for
            a WebP whose RIFF header declares more bytes than it has) and pixel-data ``corrupt``
            files pass here and are caught by the decoder.
    """
    with reasons(data):
        image = open_image(data, max_pixels, max_bytes)
        turned = exif_orientation(image) if image.format in JPEG_FORMATS else 1
        return Header(image.format, image.mode, turned, *image.size)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image, 1-8; 1 when absent, invalid, or in an EXIF block
    Pillow cannot parse (a damaged block is metadata lost, not a bad photo: Pillow raises
    ``SyntaxError``, ``struct.error`` and others from it, even when the pixels are fine).

    Call it for a JPEG (whose EXIF comes with the header) or after the pixels are loaded: Pillow's
    PNG plugin loads them to find the block, and an error in them would be taken for a damaged block.
    """
    try:
        value = image.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - any failure to parse the block means no orientation
        return 1
    return value if value in range(1, 9) else 1


def open_image(data: bytes, max_pixels: int, max_bytes: int | None) -> Image.Image:
    """The file opened by Pillow (header read, pixels not), after the checks that need no pixel data.

    Call it inside :func:`reasons`, which turns Pillow's errors into :class:`ImageRejected`.
    """
    if not data:
        raise ImageRejected("the image is empty (0 bytes); send the photo file's contents", "empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageRejected(f"the image is {len(data)} bytes, more than the {max_bytes}-byte limit; "
                            "send a smaller file", "too_large")
    document = sniff_document(data)
    if document:
        raise ImageRejected(f"{document} files are documents, not photos; export the picture as JPEG or PNG "
                            f"(one of {', '.join(FORMATS)})", "unsupported_format")
    # DecompressionBombWarning is ignored by `reasons`: max_pixels decides.
    image = Image.open(io.BytesIO(data), formats=FORMATS)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(f"the image is {width}x{height} px, more than the {max_pixels}-pixel limit "
                            "(LOOKALIKE_MAX_PIXELS); send a smaller photo", "too_many_pixels")
    if min(width, height) < MIN_SIDE_PX:
        raise ImageRejected(f"the image is {width}x{height} px; both sides must be at least "
                            f"{MIN_SIDE_PX} px, send a larger photo", "too_small")
    return image


@contextlib.contextmanager
def reasons(data: bytes) -> Iterator[None]:
    """Pillow's exceptions while reading ``data`` -> :class:`ImageRejected` with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except UnidentifiedImageError:
        other = _other_format(data)
        if other:
            raise ImageRejected(f"{other} images are not supported; send one of {', '.join(FORMATS)}",
                                "unsupported_format") from None
        if data.startswith(SIGNATURES) or _webp(data):
            raise ImageRejected("the image's header is corrupt: it starts like an image but its size or format "
                                "fields cannot be read; re-export or re-save it", "corrupt") from None
        raise ImageRejected("the file is not an image Lookalike can read (unknown format); "
                            f"send one of {', '.join(FORMATS)}", "not_an_image") from None
    except Image.DecompressionBombError as exc:  # over twice Pillow's limit: raised in open, before our check
        raise ImageRejected(f"the image declares too many pixels to decode safely ({exc}); "
                            "send a smaller photo", "too_many_pixels") from None
    except DECODE_ERRORS as exc:
        if "truncated" in str(exc).lower() or isinstance(exc, EOFError) or _webp_cut_short(data):
            raise ImageRejected(f"the image file is truncated ({exc}): its data ends early; upload the whole "
                                "file again", "truncated") from None
        raise ImageRejected(f"the image could not be decoded ({exc}); the file is corrupt, re-export or "
                            "re-save it", "corrupt") from None


def _other_format(data: bytes) -> str | None:
    """The name of the format that one of Pillow's other plugins reads ``data`` as (``ICO``,
    ``AVIF``...), only to name it in the refusal; None when none does, or when its plugin fails on
    the file in any way (a broken AVIF raises ``RuntimeError``, a DDS with unknown pixel flags
    ``NotImplementedError``: Pillow 13)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except Exception:  # noqa: BLE001 - a refused format's plugin failing is still "not an image"
        return None


def _webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _webp_cut_short(data: bytes) -> bool:
    """A WebP whose RIFF header declares more bytes than the file has (libwebp only says it could
    not create a decoder)."""
    return _webp(data) and int.from_bytes(data[4:8], "little") + 8 > len(data)


def sniff_document(data: bytes) -> str | None:
    """``"PDF"`` or ``"SVG"`` when ``data`` starts like one (leading whitespace and a BOM allowed),
    else None. SVG: markup (``<?xml``, ``<!DOCTYPE svg``, a comment, ``<svg``) with an ``<svg``
    element in its first KiB and no ``<html`` (an HTML page is not an image either way)."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"%PDF-"):
        return "PDF"
    lowered = head.lower()
    if head.startswith(b"<") and b"<svg" in lowered and b"<html" not in lowered:
        return "SVG"
    return None
