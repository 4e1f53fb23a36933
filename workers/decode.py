"""Image bytes -> RGB pixels, refusing what is not a usable photo with a reason a person can act on.

The checks that need no pixel data, and the reason codes, are :mod:`workers.imagefile`'s (the
gateway makes them too); this module decodes the pixels: EXIF orientation applied, alpha over white,
16-bit and float samples scaled to 8 bits, large photos reduced as they are decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

from schemas.api import Box
from workers.imagefile import JPEG_FORMATS, exif_orientation, open_image, reasons

JPEG_MODES = ("RGB", "L")  # JPEG pixel modes decoded by torchvision (libjpeg-turbo) or nvJPEG; others by Pillow
EOI = b"\xff\xd9"  # a JPEG's last marker: without it the file was cut short


def decode(data: bytes, max_pixels: int, max_bytes: int | None = None) -> np.ndarray:
    """Decode an image file to RGB, EXIF orientation applied, transparency composited over white.

    JPEG (incl. CMYK, progressive, and MPO: the first image), PNG (8/16-bit, grey, palette, alpha,
    tRNS colour keys), WebP, GIF (the first frame of an animation), BMP and TIFF (the first page).
    16-bit and float samples are scaled to 8 bits (:func:`_high_depth_to_grey`); alpha is composited
    over white, like the catalog's studio backgrounds. A damaged EXIF block counts as none.

    After Pillow's header checks, a :func:`plain_jpeg` is decoded by torchvision's libjpeg-turbo
    (:func:`torchvision.io.decode_jpeg`): Pillow's pixels exactly (1,000 catalog photos,
    tests/workers/test_decode.py), and this function takes 0.37 instead of 0.41 ms at 224 px,
    2.3 instead of 3.8 ms at 1080 px and 16 instead of 101 ms at 3000 px on 2 cores. Everything
    else, and a JPEG it refuses, is decoded by Pillow, which gives the reason.

    Args:
        data: The file's bytes; the format is sniffed from them.
        max_pixels: Largest width x height accepted (decompression-bomb guard, LOOKALIKE_MAX_PIXELS).
        max_bytes: Largest file accepted, or None for no limit.

    Returns:
        uint8 array (H, W, 3), RGB, H and W after EXIF rotation.

    Raises:
        ImageRejected: ``code`` is one of the reason codes of :mod:`workers.imagefile`; the message
            names the value and what to send instead.
    """
    with reasons(data):
        image = open_image(data, max_pixels, max_bytes)
        return _pixels(image, data, whole=True)[0]


@dataclass(frozen=True)
class Decoded:
    """A photo decoded by :func:`decode_reduced`, maybe at a fraction of its size (or whole on the
    model's device, :func:`workers.gpu.decode_on`).

    Attributes:
        pixels: uint8 (h, w, 3) RGB, EXIF orientation applied: an array, or a tensor on the device.
        width: The upload's width in pixels, EXIF orientation applied (the pixels' own when not reduced).
        height: The upload's height in pixels, likewise.
    """

    pixels: np.ndarray | torch.Tensor
    width: int
    height: int

    def to_upload(self, box: Box) -> Box:
        """``box`` in pixels of ``pixels`` -> the box of the upload that holds the same part: edges
        scaled by the upload's size over the decoded size, outward to whole pixels."""
        return _scaled(box, self.width / self.pixels.shape[1], self.height / self.pixels.shape[0],
                       self.width, self.height)

    def from_upload(self, box: Box) -> Box:
        """``box`` in pixels of the upload (inside it) -> in pixels of ``pixels``: the inverse of
        :meth:`to_upload`, outward to whole pixels."""
        height, width = self.pixels.shape[:2]
        return _scaled(box, width / self.width, height / self.height, width, height)


def _scaled(box: Box, sx: float, sy: float, width: int, height: int) -> Box:
    """``box`` with its edges times ``sx`` and ``sy``, outward to whole pixels, within ``width`` x ``height``."""
    x0, y0 = math.floor(box.x * sx), math.floor(box.y * sy)
    x1, y1 = min(width, math.ceil((box.x + box.w) * sx)), min(height, math.ceil((box.y + box.h) * sy))
    return Box(x=x0, y=y0, w=x1 - x0, h=y1 - y0)


def decode_reduced(data: bytes, max_pixels: int, min_long_side: int, max_bytes: int | None = None,
                   region: Box | None = None) -> Decoded:
    """:func:`decode`, but an image whose long side (or ``region``'s) is at least twice
    ``min_long_side`` comes out reduced, that long side kept at ``min_long_side`` or more. A JPEG is
    decoded at 1/2, 1/4 or 1/8 of its size, the smallest that keeps it: libjpeg-turbo's scaled
    inverse DCT (:meth:`PIL.Image.Image.draft`), which skips most of the decoding work and low-passes
    the image as it goes. Other formats (and a JPEG still twice too large at 1/8) are decoded whole,
    then reduced by the largest whole factor that keeps it (the mean of each block,
    :meth:`PIL.Image.Image.reduce`, before the pixels leave Pillow): the steps after it cost less. The
    worker, the indexer and ``lookalike eval`` use it with ``min_long_side`` twice the model's input
    (``DECODE_MIN_PX``), so a product that spans half of the photo's long side (or of a caller's crop
    box) still reaches the model at 224 px or more. A 3024x4032 JPEG of 2.4 MB then decodes at 1/8
    (378x504) in 32 against 48 ms whole, and is segmented and cropped in 2.7 against 54 ms; a
    1170x2532 PNG of 5 MB is reduced at 1/5 (234x507), before the model in 46.8 against 61.2 ms,
    its pixels 0.4 MB instead of 8.9 (``lookalike bench embed``, one thread, AVX-512 AMD VM); on the
    953 validation photos scaled up 6x and 12x the search and category figures are those of the
    whole decoding (README, "Large photos").

    Args:
        data, max_pixels, max_bytes: As :func:`decode`; the limits apply to the upload's own size.
        min_long_side: Smallest long side, in pixels, that the decoded image (or region) may have.
        region: The part of the photo that will be used (a caller's crop box, in pixels of the
            upload, EXIF orientation applied), or None for all of it.

    Returns:
        The pixels and the upload's size (:class:`Decoded`); images under twice ``min_long_side``
        whole, as :func:`decode` gives them.

    Raises:
        ImageRejected: As :func:`decode`.
    """
    with reasons(data):
        image = open_image(data, max_pixels, max_bytes)
        stored = image.size
        long_side = max(stored) if region is None else max(region.w, region.h)
        if image.format in JPEG_FORMATS and long_side >= 2 * min_long_side:
            image.draft("RGB", tuple(math.ceil(side * min_long_side / long_side) for side in stored))
        # What the decoder leaves to reduce: every format but JPEG, and a JPEG still twice too large at 1/8.
        factor = int(long_side * image.size[0] / stored[0]) // min_long_side
        pixels, orientation = _pixels(image, data, whole=image.size == stored, factor=factor)
        width, height = stored[::-1] if orientation in (5, 6, 7, 8) else stored  # EXIF turned it
        return Decoded(pixels, width, height)


def _pixels(image: Image.Image, data: bytes, whole: bool, factor: int = 1) -> tuple[np.ndarray, int]:
    """The pixels of an image :func:`workers.imagefile.open_image` gave, ``whole`` or reduced by its
    ``draft``, turned by its EXIF orientation, and reduced by ``factor`` if it is 2 or more (the mean
    of each factor x factor block, :meth:`PIL.Image.Image.reduce`, before the pixels are copied out
    of Pillow, so that only the reduced ones are): uint8 (H, W, 3) RGB, and the orientation that
    turned them (1-8; 1 for a TIFF, which Pillow turns as it loads it, its size already turned).

    The EXIF block is read after the pixels (but a plain JPEG's, read with its header): a PNG may
    carry it after them, and reading it first would load them inside
    :func:`workers.imagefile.exif_orientation`, which takes any error for a damaged EXIF block.
    """
    if whole and factor < 2 and plain_jpeg(image.format, image.mode, data):
        orientation = exif_orientation(image)
        pixels = decode_jpegs([data], [orientation], torch.device("cpu"))
        if pixels is not None:  # else corrupt: Pillow, below, says why
            return np.ascontiguousarray(pixels[0].numpy()), orientation
    image.load()  # the first frame or page only
    orientation = exif_orientation(image)
    if orientation != 1:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the pixels
    return _to_rgb(image, factor), orientation


def plain_jpeg(fmt: str, mode: str, data: bytes) -> bool:
    """A whole RGB or grey JPEG: what libjpeg-turbo (torchvision) and nvJPEG decode to RGB. CMYK and
    other modes go to Pillow, and so does a JPEG without its end-of-image marker (cut short: Pillow
    says ``truncated``)."""
    return fmt == "JPEG" and mode in JPEG_MODES and data.rstrip(b"\x00").endswith(EOI)


def decode_jpegs(files: list[bytes], orientations: list[int], device: torch.device) -> list[torch.Tensor] | None:
    """:func:`plain_jpeg` files decoded in one call of :func:`torchvision.io.decode_jpeg` (libjpeg-turbo
    on the CPU, nvJPEG on CUDA), each turned by its EXIF orientation (1-8): uint8 (H, W, 3) RGB
    tensors on ``device``, in order; None when the decoder refuses one of them (Pillow then says
    which and why)."""
    try:
        decoded = decode_jpeg([torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files],
                              mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None
    return [_orient(pixels, orientation).permute(1, 2, 0) for pixels, orientation in zip(decoded, orientations)]


def _orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to (C, H, W) pixels, as :func:`PIL.ImageOps.exif_transpose` does."""
    if orientation in (5, 6, 7, 8):  # the four that swap width and height
        pixels = {5: pixels.transpose(1, 2), 6: torch.rot90(pixels, -1, (1, 2)), 7: pixels.transpose(1, 2).flip(1, 2),
                  8: torch.rot90(pixels, 1, (1, 2))}[orientation]
    elif orientation in (2, 3, 4):
        pixels = pixels.flip({2: (2,), 3: (1, 2), 4: (1,)}[orientation])
    return pixels


def _to_rgb(image: Image.Image, factor: int) -> np.ndarray:
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_grey(image)
    elif image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            image.mode in ("P", "L", "RGB") and "transparency" in image.info):  # a palette entry, PNG's tRNS colour key
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode not in ("L", "RGB"):  # palettes, CMYK, 1 bit, ...: their RGB colours before the mean
        image = image.convert("RGB")
    if factor >= 2:
        image = image.reduce(factor)  # grey before it becomes three channels (7x less work at 12 MP)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def _high_depth_to_grey(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit or float grey (PNG, TIFF) as 8-bit grey (mode ``L``), scaled to 0-255 (Pillow's
    own convert would clip at 255): integers by 65535 -> 255; floats by 1.0 -> 255 when they lie in
    0-1 (the usual range of float samples), else stretched from their lowest to their highest, NaN
    and infinities as the lowest. A PNG's tRNS grey key (transparent pixels) becomes white."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        finite = np.isfinite(values)
        low, high = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 1.0)
        if low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0
        values = (np.where(finite, values, low) - low) / max(high - low, 1e-12) * 255.0
    else:
        values = values / 257.0  # 65535 -> 255
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if isinstance(image.info.get("transparency"), int):
        grey[np.asarray(image) == image.info["transparency"]] = 255
    return Image.fromarray(grey)
