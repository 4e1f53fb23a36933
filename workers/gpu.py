"""The front of the vision pipeline on the model's device: decode, resize and letterbox as tensors.

On CUDA a micro-batch's JPEG files are decoded in one call by nvJPEG
(``torchvision.io.decode_jpeg`` with a list of files and ``device="cuda"``), and the pixels stay
on the GPU through segmentation (:class:`workers.segment.Segmenter`), cropping and letterboxing
(:class:`workers.embed.Embedder`), which take these tensors as well as numpy arrays. Resizing and
letterboxing (:func:`resize`, :func:`letterbox`) are these tensor ops for numpy arrays too, and
:func:`workers.decode.decode` decodes plain JPEGs with torchvision as well. On the CPU the rest of
the numpy path (the mask upsampled and painted as numpy arrays) is about 0.5 ms an image faster
than this one at batch 1, so the worker uses this path on CUDA
only unless ``LOOKALIKE_DEVICE_PREPROCESS=on``; the same code runs on the CPU in the tests.

Every file first passes the header checks of :func:`workers.imagefile.header` (size, format, pixel
limits). Files nvJPEG is not given, or refuses, are decoded by Pillow (:func:`workers.decode.decode`),
which gives the reason when a file is bad: CMYK and other non-RGB/grey JPEGs, PNG, WebP, GIF, BMP,
TIFF, and JPEGs without their end-of-image marker (cut short: Pillow says ``truncated``).

Tensors here are uint8 (H, W, 3) RGB, the layout of the numpy arrays of :mod:`workers.decode`
(a permuted view of torchvision's (3, H, W)), so slicing a crop box is the same for both.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from workers.decode import decode, decode_jpegs, plain_jpeg
from workers.imagefile import header

# Decoded arrays are read-only (Pillow's buffers); the tensors shared with them (torch.as_tensor) are only read.
warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)


def wanted(setting: str, device: torch.device) -> bool:
    """Whether to preprocess on ``device``, by ``LOOKALIKE_DEVICE_PREPROCESS`` (``auto``: on CUDA only)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def decode_on(device: torch.device, files: list[bytes], max_pixels: int) -> list[torch.Tensor]:
    """Decode a batch of image files onto ``device``, EXIF orientation applied.

    Args:
        device: Where the pixels go (``cuda``; ``cpu`` in tests).
        files: The files' bytes.
        max_pixels: Largest width x height (LOOKALIKE_MAX_PIXELS).

    Returns:
        One uint8 (H, W, 3) RGB tensor on ``device`` per file, in order.

    Raises:
        ImageRejected: for the first file that is refused (a caller with several files retries
            them one by one to learn which; :meth:`workers.tasks.Runtime._stage` does).
    """
    headers = [header(data, max_pixels) for data in files]
    out: list[torch.Tensor | None] = [None] * len(files)
    jpegs = [i for i, h in enumerate(headers) if plain_jpeg(h.format, h.mode, files[i])]
    if jpegs:  # None when one of them is corrupt: Pillow, below, says which and why
        decoded = decode_jpegs([files[i] for i in jpegs], [headers[i].orientation for i in jpegs], device)
        for i, pixels in zip(jpegs, decoded or []):
            out[i] = pixels
    return [pixels if pixels is not None else torch.tensor(decode(files[i], max_pixels), device=device)
            for i, pixels in enumerate(out)]


def resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize with antialiasing, as Pillow's ``BILINEAR``: uint8 (H, W, 3) -> uint8 (height, width, 3),
    on the same device.

    On the CPU this is torch's uint8 channels-last kernel (ported from Pillow-SIMD), 2.5-3.4x faster
    than Pillow on 2 cores (measured with the planar route; this one takes about half of that at
    224 px): within two levels of Pillow's pixels (letterboxing 500 catalog crops, 0.05% of the
    pixels differ; tests/workers/test_gpu.py); the result is contiguous when the input is a contiguous
    (H, W, 3) array or a crop of one. CUDA has no uint8 kernel: there it runs in float, as
    torchvision's ``antialias=True`` is meant to match Pillow.
    """
    if pixels.device.type == "cpu":
        # (1, 3, H, W) strided as channels_last, the batch dimension included (``permute(2, 0, 1)[None]``
        # gives it a stride of 3, and torch then takes the input for planar): the kernel's fast path,
        # which writes channels_last, so the (H, W, 3) result is contiguous. Same pixels as the planar
        # route, in half the time at 224 px, and stacking a batch of them is a plain copy.
        x = F.interpolate(pixels[None].permute(0, 3, 1, 2), size=(height, width), mode="bilinear", antialias=True,
                          align_corners=False)
        return x[0].permute(1, 2, 0)
    x = pixels.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def letterbox(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Pad to a square with white (catalog photos are on white) and resize to ``size``, keeping the
    aspect: uint8 (H, W, 3) -> uint8 (size, size, 3), on the same device."""
    height, width = pixels.shape[:2]
    side = max(height, width)
    if height != width:
        square = torch.full((side, side, 3), 255, dtype=torch.uint8, device=pixels.device)
        top, left = (side - height) // 2, (side - width) // 2
        square[top:top + height, left:left + width] = pixels
        pixels = square
    return pixels if side == size else resize(pixels, size, size)
