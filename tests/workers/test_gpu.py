"""The device path of the vision pipeline (workers/gpu.py): the same corpus of files as test_decode,
the same reasons, the same pixels; segmentation and embeddings as the Pillow path gives them. Runs on
the CPU (torchvision's libjpeg decoder) and, where there is one, on CUDA (nvJPEG)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import SAMPLE
from tests.workers.test_decode import BAD, GOOD, MAX_PIXELS, with_orientation
from workers.decode import decode
from workers.embed import Embedder
from workers.errors import ImageRejected
from workers.gpu import decode_on, letterbox, resize
from workers.segment import Segmenter

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
JPEG_TOLERANCE = 3  # nvJPEG's IDCT and chroma upsampling may differ from libjpeg-turbo's by a few levels


@pytest.mark.parametrize("device", DEVICES)
def test_every_good_file_decodes_to_the_pixels_pillow_gives(device):
    names = list(GOOD) + [f"orientation_{o}" for o in range(1, 9)]
    files = [GOOD[name][0] for name in GOOD] + [with_orientation(o) for o in range(1, 9)]
    decoded = decode_on(torch.device(device), files, MAX_PIXELS)  # one batch, as a worker decodes
    for name, data, pixels in zip(names, files, decoded):
        expected = decode(data, MAX_PIXELS)
        assert pixels.device.type == device and pixels.dtype == torch.uint8, name
        assert tuple(pixels.shape) == expected.shape, name
        assert np.abs(pixels.cpu().numpy().astype(int) - expected).max() <= JPEG_TOLERANCE, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BAD)
def test_every_bad_file_is_refused_with_pillows_reason(device, name):
    data, code, words = BAD[name]
    with pytest.raises(ImageRejected) as caught:
        decode_on(torch.device(device), [GOOD["jpeg"][0], data], MAX_PIXELS)
    assert caught.value.code == code, caught.value.message
    assert words in caught.value.message


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [decode(p.read_bytes(), MAX_PIXELS) for p in sorted((SAMPLE / "images").glob("*.jpg"))[:48]]


@pytest.mark.parametrize("device", DEVICES)
def test_segmenting_tensors_finds_the_boxes_pillow_finds(device, photos):
    segmenter = Segmenter(device)
    on_device = [torch.tensor(p, device=device) for p in photos]
    for image, a, b in zip(on_device, segmenter.segment(photos), segmenter.segment(on_device)):
        assert a.confident == b.confident
        assert max(abs(a.box.x - b.box.x), abs(a.box.y - b.box.y), abs(a.box.w - b.box.w),
                   abs(a.box.h - b.box.h)) <= 3, (a.box, b.box)  # the 128-px resize differs by a level here and there
        painted = segmenter.apply(image, b)
        if b.confident:
            assert painted.device.type == device and tuple(painted.shape) == (b.box.h, b.box.w, 3)
        else:
            assert painted is image


def test_resizing_on_the_cpu_gives_pillows_pixels_within_two_levels(photos):
    """torch's uint8 kernel, which letterboxing and segmenting use on the CPU, against Pillow's BILINEAR."""
    for image in photos[:16]:
        h, w = image.shape[:2]
        crop = np.ascontiguousarray(image[h // 8:h - h // 5, w // 6:w - w // 9])
        for size in (224, 128, 40):  # enlarging, shrinking, shrinking past Pillow's reducing gap
            expected = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR))
            out = resize(torch.from_numpy(crop), size, size).numpy().astype(int)
            assert np.abs(out - expected).max() <= 2, size


def test_resizing_on_the_cpu_writes_contiguous_pixels_equal_to_the_planar_route(photos):
    """The channels_last route (the uint8 kernel's fast path) against the planar one torch takes when
    the batch dimension's stride hides the layout: the same pixels, and a contiguous (H, W, 3) result
    that a batch stacks by plain copy."""
    for image in photos[:8]:
        crop = torch.from_numpy(image)[5:-20, 11:-3]  # a view, as a crop box gives
        planar = torch.nn.functional.interpolate(crop.permute(2, 0, 1)[None], size=(224, 150), mode="bilinear",
                                                 antialias=True, align_corners=False)[0]
        out = resize(crop, 224, 150)
        assert out.is_contiguous() and torch.equal(out, planar.permute(1, 2, 0))


def test_letterbox_pads_with_white_and_keeps_the_aspect():
    red = torch.zeros((40, 80, 3), dtype=torch.uint8)
    red[..., 0] = 200
    out = letterbox(red, 224)
    assert tuple(out.shape) == (224, 224, 3)
    assert out[0, 112].tolist() == [255, 255, 255] and out[-1, 112].tolist() == [255, 255, 255]  # bands above, below
    assert out[112, 0].tolist() == [200, 0, 0] and out[112, -1].tolist() == [200, 0, 0]  # full width


@pytest.mark.parametrize("device", DEVICES)
def test_embeddings_from_the_device_path_match_the_pillow_path(embedder, photos, device):
    """The vectors a CUDA worker computes for queries are searched against the catalog's, made by the
    Pillow path on the CPU: they agree to cosine 0.98 or better, median 0.999 (0.995 in bfloat16 on CUDA)."""
    pillow = embedder.embed([crop for crop, _ in Segmenter("cpu").crop_all(photos)])
    model = embedder if device == "cpu" else Embedder("test-model", device=device)
    segmenter = Segmenter(device)
    tensors = model.embed([crop for crop, _ in segmenter.crop_all([torch.tensor(p, device=device) for p in photos])])
    cosine = (pillow * tensors).sum(axis=1)
    assert cosine.min() >= 0.98 and np.median(cosine) >= (0.999 if device == "cpu" else 0.995), cosine
