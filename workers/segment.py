"""Foreground segmentation of product photos: find the product against its background, crop to it.

Catalog photos are studio shots on a white or uniform background, sometimes worn by a model.
The method is classical and batched (torch tensor ops, on the worker's device):

1. Each image is resized to ``work_px`` x ``work_px`` (the mask's working resolution).
2. Background colour: the per-channel median of a border ring ``border_px`` wide.
3. Border uniformity: the fraction of ring pixels within ``threshold`` of that colour. A
   cluttered or full-bleed photo has a non-uniform border, so it is not segmented.
4. Foreground: pixels farther than ``threshold`` (max over RGB channels, 0-255) from the
   background colour, cleaned with a morphological closing then opening (max pooling of the
   mask and of its complement, after Serra, "Image Analysis and Mathematical Morphology", 1982).
5. Holes: pixels with product on all four sides (left, right, above and below) are product too,
   so a white logo on a white shirt is not painted over.
6. The box is the union of the mask's rows and columns, widened by ``margin`` of its size.
7. Confident when the border is uniform (>= ``min_border_uniformity``) and the foreground
   fraction lies in [``min_foreground``, ``max_foreground``]; otherwise the whole image is used.

The box comes from the mask after an opening (specks gone); the painted mask skips the opening,
so thin parts of the product (straps, laces, a watch's crown) are never painted over.

:meth:`Segmenter.apply` paints the background white (the catalog's background) and crops to
the box; the embedder then pads the crop to a square with white, so the aspect is kept.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from schemas.api import Box
from workers import gpu


@dataclass(frozen=True)
class Segment:
    """Where the product is in one image.

    Attributes:
        box: The crop, in pixels of the image (margin included; the whole image when not confident).
        mask: bool (H, W), True on the product (all True when not confident); a numpy array, or a
            tensor on the segmenter's device when the image was one (:mod:`workers.gpu`).
        confident: Whether segmentation found a product; False means the whole image is used.
        border_uniformity: Fraction of border pixels close to the background colour, 0-1.
        foreground: Fraction of the image that is product, 0-1.
    """

    box: Box
    mask: np.ndarray | torch.Tensor
    confident: bool
    border_uniformity: float = 0.0
    foreground: float = 1.0


class Segmenter:
    """Batched background/foreground split for product photos (see the module docstring)."""

    def __init__(self, device: str | torch.device = "cpu", work_px: int = 128, border_px: int = 3,
                 threshold: float = 24.0, margin: float = 0.04, min_border_uniformity: float = 0.6,
                 min_foreground: float = 0.01, max_foreground: float = 0.97) -> None:
        self.device = torch.device(device)
        self.work_px, self.border_px, self.threshold, self.margin = work_px, border_px, threshold, margin
        self.min_border_uniformity = min_border_uniformity
        self.min_foreground, self.max_foreground = min_foreground, max_foreground
        _masks()  # compiled here, before any worker thread segments

    def segment(self, images: list[np.ndarray] | list[torch.Tensor]) -> list[Segment]:
        """Segment a batch.

        Args:
            images: N uint8 (H, W, 3) RGB, any sizes: numpy arrays or tensors on this segmenter's device
                (resized there, :func:`workers.gpu.resize`).

        Returns:
            N :class:`Segment`, in order.
        """
        if not images:
            return []
        s = self.work_px
        on_device = isinstance(images[0], torch.Tensor)
        with torch.inference_mode():
            # (N, 3, S, S) planar (stacking transposes the resize's (S, S, 3)), so that the per-channel ops
            # below vectorise (channels_last stacks as a plain copy, but made the masks 0.5 ms a batch of 8 slower)
            x = torch.stack([gpu.resize(torch.as_tensor(im, device=self.device), s, s).permute(2, 0, 1)
                             for im in images]).float()
            fg, rows, cols, confident, uniformity, fraction = _masks()(
                x, self.border_px, self.threshold, self.min_border_uniformity, self.min_foreground, self.max_foreground)
            if not on_device:
                fg = fg.cpu().numpy()
            rows, cols = rows.cpu().numpy(), cols.cpu().numpy()
            confident, uniformity, fraction = confident.cpu().numpy(), uniformity.cpu().numpy(), fraction.cpu().numpy()
        return [self._segment_one(image, fg[i], rows[i], cols[i], bool(confident[i]), float(uniformity[i]),
                                  float(fraction[i])) for i, image in enumerate(images)]

    def apply(self, image: np.ndarray | torch.Tensor, segment: Segment) -> np.ndarray | torch.Tensor:
        """The image with the background painted white, cropped to ``segment.box``.

        Args:
            image: uint8 (H, W, 3) RGB, the one that was segmented (array or device tensor).
            segment: Its :class:`Segment`.

        Returns:
            uint8 (h, w, 3) RGB of the same kind; ``image`` itself when the segment is not confident.
        """
        if not segment.confident:
            return image
        b = segment.box
        inside = (slice(b.y, b.y + b.h), slice(b.x, b.x + b.w))
        if isinstance(image, torch.Tensor):
            return torch.where(segment.mask[inside][:, :, None], image[inside], 255).to(torch.uint8)
        painted = Image.new("RGB", (b.w, b.h), (255, 255, 255))  # Pillow's paste through a mask: 3x np.where's speed
        painted.paste(Image.fromarray(image[inside]), None, Image.fromarray(segment.mask[inside]))
        return np.asarray(painted)

    def crop_all(self, images: list[np.ndarray] | list[torch.Tensor]) -> list[tuple[np.ndarray | torch.Tensor, Box]]:
        """``segment`` then ``apply`` a batch: the pixels to embed, and the box they came from."""
        return [(self.apply(image, seg), seg.box) for image, seg in zip(images, self.segment(images))]

    def _segment_one(self, image: np.ndarray | torch.Tensor, fg: np.ndarray | torch.Tensor, rows: np.ndarray,
                     cols: np.ndarray, confident: bool, uniformity: float, fraction: float) -> Segment:
        height, width = image.shape[:2]
        whole = Box(x=0, y=0, w=width, h=height)
        if not confident or not rows.any():
            everything = (torch.ones((height, width), dtype=torch.bool, device=fg.device)
                          if isinstance(fg, torch.Tensor) else np.ones((height, width), dtype=bool))
            return Segment(whole, everything, False, uniformity, fraction)
        s = self.work_px
        y0, y1 = np.flatnonzero(rows)[[0, -1]]
        x0, x1 = np.flatnonzero(cols)[[0, -1]]
        # Working-resolution rows/columns -> image pixels, then the margin, clipped to the image.
        top, bottom = y0 * height / s, (y1 + 1) * height / s
        left, right = x0 * width / s, (x1 + 1) * width / s
        pad = self.margin * max(bottom - top, right - left)
        top, left = max(0, math.floor(top - pad)), max(0, math.floor(left - pad))
        bottom, right = min(height, math.ceil(bottom + pad)), min(width, math.ceil(right + pad))
        # Nearest-neighbour upsampling of the mask, dilated by one working pixel first so that
        # the blocky edge falls on the background side, never on the product.
        arange = functools.partial(torch.arange, device=fg.device) if isinstance(fg, torch.Tensor) else np.arange
        mask = fg[arange(height) * s // height][:, arange(width) * s // width]
        return Segment(Box(x=left, y=top, w=right - left, h=bottom - top), mask, True, uniformity, fraction)


def _masks_eager(x: torch.Tensor, border_px: int, threshold: float, min_border_uniformity: float,
                 min_foreground: float, max_foreground: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2-5 and 7 of the module docstring on a batch (run as TorchScript, :func:`_masks`).

    Args:
        x: float (N, 3, S, S), planar RGB 0-255 at the working resolution.
        border_px: Width of the border ring, in pixels at the working resolution.
        threshold, min_border_uniformity, min_foreground, max_foreground: as :class:`Segmenter`.

    Returns:
        (painted mask bool (N, S, S), box rows bool (N, S), box columns bool (N, S), confident bool (N,),
        border uniformity float (N,), foreground fraction float (N,)).
    """
    ring = _ring(x, border_px)  # (N, 3, R)
    background = ring.kthvalue((ring.size(2) + 1) // 2, dim=2).values  # (N, 3): median()'s lower median, 2.6x faster
    distance = (x - background[:, :, None, None]).abs_().amax(dim=1, keepdim=True)  # (N, 1, S, S)
    uniformity = (_ring(distance, border_px) <= threshold).float().mean(dim=(1, 2))
    fg = _close(distance > threshold, 5)
    fg = fg | (_between(fg, 3) & _between(fg, 2))  # holes: product on all four sides
    solid = _open(fg, 3)  # without specks: for the box; the painted mask keeps thin parts (straps, laces)
    fraction = solid.float().mean(dim=(1, 2, 3))
    solid8 = solid.to(torch.uint8)  # any() as the max of the bytes: bool any() was ~20x slower here
    rows, cols = solid8.amax(dim=3)[:, 0] > 0, solid8.amax(dim=2)[:, 0] > 0
    confident = (uniformity >= min_border_uniformity) & (fraction >= min_foreground) & (fraction <= max_foreground)
    return _dilate(fg, 3)[:, 0], rows, cols, confident, uniformity, fraction


@functools.cache
def _masks():
    """:func:`_masks_eager` compiled by ``torch.jit.script`` (once per process, by the first
    :class:`Segmenter`): its ~100 small tensor ops then run in one call without the GIL. Eager, each op
    releases and takes the GIL back, and two threads segmenting at once did 0.6x the work of one
    alone (compiled: 2.1x; README, Micro-batching)."""
    return torch.jit.script(_masks_eager)


def _ring(x: torch.Tensor, b: int) -> torch.Tensor:
    """The border ring ``b`` pixels wide of (N, C, S, S) ``x``: (N, C, R), each ring pixel once (top and
    bottom rows whole, then the rows between at the left and right edges), gathered by slicing: less
    than half the time of indexing with the ring's flat indices."""
    return torch.cat([x[:, :, :b].flatten(2), x[:, :, -b:].flatten(2), x[:, :, b:-b, :b].flatten(2),
                      x[:, :, b:-b, -b:].flatten(2)], dim=2)


def _shifted(mask: torch.Tensor, k: int, dim: int, dilate: bool) -> torch.Tensor:
    """``mask`` ORed (``dilate``) or ANDed with itself shifted by 1..k//2 both ways along ``dim``, in
    place of a padded copy. A shift that leaves the image combines nothing: outside counts as
    background for a dilation and as foreground for an erosion (as pooling ``1 - mask`` ignores its
    padding)."""
    out, n = mask.clone(), mask.size(dim)
    for i in range(1, k // 2 + 1):
        for a, b in ((i, 0), (0, i)):
            if dilate:
                out.narrow(dim, a, n - i).logical_or_(mask.narrow(dim, b, n - i))
            else:
                out.narrow(dim, a, n - i).logical_and_(mask.narrow(dim, b, n - i))
    return out


def _dilate(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Binary dilation with a k x k square (k odd): bool (N, 1, S, S) -> same. Separable, as two
    passes of shifted ORs; equal to max pooling with stride 1 and ``k // 2`` padding, several
    times faster on the CPU for these small masks."""
    return _shifted(_shifted(mask, k, 3, True), k, 2, True)


def _erode(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Binary erosion with a k x k square, outside the image counting as foreground."""
    return _shifted(_shifted(mask, k, 3, False), k, 2, False)


def _close(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Fill gaps narrower than ``k`` px: dilate, then erode. mask: bool (N, 1, S, S)."""
    return _erode(_dilate(mask, k), k)


def _open(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Remove specks narrower than ``k`` px: erode, then dilate."""
    return _dilate(_erode(mask, k), k)


def _between(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """True where ``mask`` has a True at or before, and one at or after, along ``dim`` (counted with a
    cumulative sum: some before when the count so far is > 0, some after when it is short of the
    total). Holes are where this holds along both rows and columns. mask: bool (N, 1, S, S)."""
    count = mask.cumsum(dim, dtype=torch.int16)  # S <= 32767
    total = count.narrow(dim, count.size(dim) - 1, 1)
    return (count > 0) & (count - mask.to(torch.int16) < total)


def overlay(image: np.ndarray, segment: Segment) -> np.ndarray:
    """For a person to look: background tinted magenta, box in green (red when not confident, whole image).

    Args:
        image: uint8 (H, W, 3) RGB.
        segment: Its :class:`Segment`.

    Returns:
        uint8 (H, W, 3) RGB.
    """
    out = image.astype(np.float32)
    out[~segment.mask] = 0.55 * out[~segment.mask] + 0.45 * np.array([255, 0, 255], dtype=np.float32)
    out = out.astype(np.uint8)
    b, colour = segment.box, (0, 200, 0) if segment.confident else (230, 0, 0)
    t = max(1, round(max(image.shape[:2]) / 150))  # line width in pixels
    out[b.y:b.y + t, b.x:b.x + b.w] = out[b.y + b.h - t:b.y + b.h, b.x:b.x + b.w] = colour
    out[b.y:b.y + b.h, b.x:b.x + t] = out[b.y:b.y + b.h, b.x + b.w - t:b.x + b.w] = colour
    return out


def segmented(embed: Callable[[list[np.ndarray]], np.ndarray], segmenter: Segmenter | None
              ) -> Callable[[list[np.ndarray]], np.ndarray]:
    """``embed`` preceded by cropping each image to its product: the vector function of a model
    version that segments (``LOOKALIKE_SEGMENT``, as the worker and the indexer do); ``embed``
    itself when ``segmenter`` is None. Images: N uint8 (H, W, 3) RGB -> float32 (N, D)."""
    if segmenter is None:
        return embed
    return lambda images: embed([crop for crop, _ in segmenter.crop_all(images)]) if images else embed([])
