import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from ops.cli import app
from workers import segment
from workers.decode import decode
from workers.segment import Segmenter

SAMPLE = Path(__file__).parents[2] / "ops" / "sample" / "images"


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter("cpu")


def scene(background, size=(300, 200), box=(80, 50, 120, 90), colour=(30, 60, 150)):
    """uint8 (H, W, 3): a ``colour`` rectangle at box=(x, y, w, h) on ``background``."""
    width, height = size
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = background
    x, y, w, h = box
    image[y:y + h, x:x + w] = colour
    return image


def covers(seg_box, box, slack):
    x, y, w, h = box
    return (x - slack <= seg_box.x <= x and y - slack <= seg_box.y <= y
            and x + w <= seg_box.x + seg_box.w <= x + w + slack and y + h <= seg_box.y + seg_box.h <= y + h + slack)


@pytest.mark.parametrize("background", [(255, 255, 255), (128, 128, 128), (235, 225, 210)])
def test_object_on_uniform_background_is_boxed_and_background_painted_white(segmenter, background):
    image = scene(background)
    seg = segmenter.segment([image])[0]
    assert seg.confident
    assert covers(seg.box, (80, 50, 120, 90), slack=12), seg.box
    out = segmenter.apply(image, seg)
    assert out.shape == (seg.box.h, seg.box.w, 3)
    assert (out[out.shape[0] // 2, out.shape[1] // 2] == (30, 60, 150)).all()  # product kept
    assert (out[0, 0] == 255).all()  # the margin is background, painted white


def test_hole_inside_the_product_is_not_painted(segmenter):
    image = scene((128, 128, 128), box=(40, 40, 120, 200))
    image[100:140, 80:120] = 128  # a background-coloured patch inside the product
    seg = segmenter.segment([image])[0]
    out = segmenter.apply(image, seg)
    assert seg.confident and (out[100 - seg.box.y + 20, 80 - seg.box.x + 20] == 128).all()


def test_full_bleed_photo_falls_back_to_the_whole_image(segmenter):
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, (15, 10, 3)), np.ones((20, 20, 1))).astype(np.uint8)  # 300x200 blocks
    seg = segmenter.segment([image])[0]
    assert not seg.confident
    assert (seg.box.x, seg.box.y, seg.box.w, seg.box.h) == (0, 0, 200, 300) and seg.mask.all()
    assert segmenter.apply(image, seg) is image


def test_blank_image_falls_back(segmenter):
    image = np.full((100, 100, 3), 255, dtype=np.uint8)
    assert not segmenter.segment([image])[0].confident


def test_batch_of_mixed_sizes_keeps_order(segmenter):
    images = [scene((255, 255, 255)), scene((255, 255, 255), size=(64, 900), box=(10, 300, 40, 200))]
    first, second = segmenter.segment(images)
    assert first.mask.shape == (200, 300) and second.mask.shape == (900, 64)
    assert covers(second.box, (10, 300, 40, 200), slack=30), second.box


@pytest.mark.parametrize("product_id", [10003, 10105, 10148, 10184, 10196, 10500, 11235, 16079])
def test_real_catalog_photos(segmenter, product_id):
    image = decode((SAMPLE / f"{product_id}.jpg").read_bytes(), 4096 * 4096)
    seg = segmenter.segment([image])[0]
    b = seg.box
    assert seg.confident
    assert 0 <= b.x and 0 <= b.y and b.x + b.w <= image.shape[1] and b.y + b.h <= image.shape[0]
    # Every clearly non-white pixel (a product pixel) lies in the box and survives apply unchanged.
    product = np.abs(image.astype(int) - 255).max(axis=2) > 60
    ys, xs = np.nonzero(product)
    assert b.y <= ys.min() and ys.max() < b.y + b.h and b.x <= xs.min() and xs.max() < b.x + b.w
    out = segmenter.apply(image, seg)
    assert (out[ys - b.y, xs - b.x] == image[ys, xs]).all()


def test_the_compiled_masks_equal_the_eager_ones(segmenter):
    """The worker runs the mask steps as TorchScript; they must give exactly what the Python gives."""
    images = [decode(p.read_bytes(), 4096 * 4096) for p in sorted(SAMPLE.glob("*.jpg"))[:16]]
    s = segmenter.work_px
    x = torch.stack([segment.gpu.resize(torch.from_numpy(im), s, s).permute(2, 0, 1) for im in images]).float()
    args = (x, segmenter.border_px, segmenter.threshold, segmenter.min_border_uniformity, segmenter.min_foreground,
            segmenter.max_foreground)
    for compiled, eager in zip(segment._masks()(*args), segment._masks_eager(*args)):
        assert torch.equal(compiled, eager)


def test_morphology_equals_max_pooling():
    """Dilation and erosion by shifted ORs/ANDs are max pooling of the mask and of its complement."""
    mask = torch.rand(3, 1, 40, 33, generator=torch.Generator().manual_seed(0)) > 0.6
    for k in (3, 5):
        pooled = F.max_pool2d(mask.float(), k, stride=1, padding=k // 2) > 0
        assert torch.equal(segment._dilate(mask, k), pooled)
        pooled = F.max_pool2d((~mask).float(), k, stride=1, padding=k // 2) == 0
        assert torch.equal(segment._erode(mask, k), pooled)


def test_holes_are_the_pixels_with_product_on_all_four_sides():
    mask = torch.rand(2, 1, 30, 30, generator=torch.Generator().manual_seed(1)) > 0.8
    m = mask.numpy()[:, 0]
    expected = np.zeros_like(m)
    for n, y, x in np.ndindex(*m.shape):
        expected[n, y, x] = m[n, y, :x + 1].any() and m[n, y, x:].any() and m[n, :y + 1, x].any() and m[n, y:, x].any()
    assert np.array_equal((segment._between(mask, 3) & segment._between(mask, 2)).numpy()[:, 0], expected)


def test_segment_sheet_saves_24_photos_and_leaves_out_what_it_cannot_read(tmp_path):
    """``lookalike segment-sheet``: 24 catalog photos, spread over the whole folder, in a 6 x 4 PNG; a file that
    is not a photo (or a folder named like one) is left out, not the end of the sheet."""
    out = tmp_path / "sheet.png"
    result = CliRunner().invoke(app, ["segment-sheet", "--out", str(out), "--tile", "64"])
    assert result.exit_code == 0, result.output
    assert "24 photos" in " ".join(result.output.split())
    with Image.open(out) as sheet:
        assert (sheet.format, sheet.size) == ("PNG", (6 * 64, 4 * (64 + 14)))

    folder = tmp_path / "photos"
    folder.mkdir()
    names = sorted(SAMPLE.iterdir())
    for path in (names[0], names[-1]):  # the last one is shown too: evenly spaced from first to last
        shutil.copy(path, folder)
    (folder / "notes.jpg").write_text("not a photo")
    (folder / "x.png").mkdir()
    result = CliRunner().invoke(app, ["segment-sheet", "--images", str(folder), "--out", str(out), "--n", "4"])
    assert result.exit_code == 0, result.output
    assert "2 photos" in " ".join(result.output.split())


@pytest.mark.parametrize("case", ["empty folder", "not png", "out is a folder", "unwritable"])
def test_segment_sheet_refuses_bad_arguments_with_one_line(tmp_path, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "dir.png").mkdir()
    args = {"empty folder": ["--images", str(tmp_path / "empty"), "--out", str(tmp_path / "a.png")],
            "not png": ["--out", str(tmp_path / "sheet.jpg")],
            "out is a folder": ["--out", str(tmp_path / "dir.png")],
            "unwritable": ["--n", "1", "--out", str(tmp_path / "missing" / "sheet.png")]}[case]
    result = CliRunner().invoke(app, ["segment-sheet", *args])
    assert result.exit_code == 1 and type(result.exception) is SystemExit, result.output
    assert result.output.startswith("error:")
