"""``lookalike train``'s inputs: styles.csv, photo folders, unreadable photos, the splits and ``--out``,
checked before anything is embedded (a fake backbone counts what it embeds)."""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import workers.embed
from ops.cli import app
from tests.conftest import SAMPLE
from workers.errors import InvalidInput
from workers.train import extract_features, photos, read_styles

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour\n"
ROW = "{},Men,Apparel,Topwear,Tshirts,Blue\n"
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def save_photo(path, colour=(200, 30, 30)):
    Image.new("RGB", (48, 64), colour).save(path, FORMATS[path.suffix.lower()])


def mean_colour(images):
    """A fake backbone: each image's mean colour, repeated to 1280 values."""
    return np.stack([np.resize(image.reshape(-1, 3).mean(0), 1280) for image in images]).astype(np.float32)


def test_read_styles_takes_a_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_bytes(("\ufeff" + HEADER + ROW.format(15970) + ROW.format(39386)).replace("\n", "\r\n").encode())
    row = {"gender": "Men", "master_category": "Apparel", "sub_category": "Topwear", "article_type": "Tshirts",
           "base_colour": "Blue"}
    assert read_styles(path) == {15970: row, 39386: row}


@pytest.mark.parametrize(("text", "message"), [
    ("", "is empty"),
    (HEADER, "has a header but no rows"),
    (HEADER.replace("id,", "") + "Men,Apparel,Topwear,Tshirts,Blue\n", "line 1: no id column"),
    (HEADER.replace(",articleType", "") + "15970,Men,Apparel,Topwear,Blue\n", "line 1: no articleType column"),
    (HEADER + ROW.format(15970) + ROW.format("15970x"), "line 3: id '15970x' is not a whole number"),
    (HEADER + ROW.format("²3"), "line 2: id '²3' is not a whole number"),
    (HEADER + ROW.format(15970) + ROW.format(39386) + ROW.format(15970), "lines 2 and 4 both have id 15970"),
])
def test_read_styles_names_the_line_and_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "styles.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InvalidInput, match=re.escape(f"{path}")) as raised:
        read_styles(path)
    assert message in raised.value.message


def test_photos_are_the_files_named_by_an_id_with_a_row(tmp_path, caplog):
    for name in ("10.jpg", "11.JPEG", "12.png", "13.WebP", "14.jpg"):
        save_photo(tmp_path / name)
    for name in ("²3.jpg", "notes.txt", "15.gif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "nested").mkdir()
    save_photo(tmp_path / "nested" / "16.jpg")
    with caplog.at_level(logging.INFO, "workers.train"):
        found = photos(tmp_path, {10, 11, 12, 13, 15, 16, 23})  # 14 has no row
    assert [p.name for p in found] == ["10.jpg", "11.JPEG", "12.png", "13.WebP"]
    assert "left out 1 without a row in styles.csv and 4 not named <id>.<jpg|jpeg|png|webp>" in caplog.text


def test_photos_refuses_two_files_of_one_product_and_a_folder_without_photos(tmp_path):
    save_photo(tmp_path / "10012.jpg")
    save_photo(tmp_path / "10012.jpeg")
    with pytest.raises(InvalidInput, match="are both photos of product 10012") as raised:
        photos(tmp_path, {10012})
    assert "10012.jpg" in raised.value.message and "10012.jpeg" in raised.value.message
    with pytest.raises(InvalidInput, match=re.escape(f"no <id>.jpg|jpeg|png|webp photos with a row in styles.csv "
                                                     f"in {tmp_path}")):
        photos(tmp_path, {10013})


def test_unreadable_photos_are_skipped_and_the_cache_keeps_ids_and_features_together(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    save_photo(images / "10.jpg", (255, 0, 0))
    (images / "11.jpg").write_text("not a photo")
    (images / "12.jpg").symlink_to(tmp_path / "gone.jpg")
    (images / "13.jpg").mkdir()
    save_photo(images / "14.png", (0, 0, 255))
    calls = []

    def embed(images):
        calls.append(len(images))
        return mean_colour(images)

    paths = photos(images, range(100))
    for _ in range(2):  # extracted, then from the cache
        caplog.clear()
        ids, x = extract_features(paths, tmp_path / "cache", embed, chunk_size=2)
        assert ids.tolist() == [10, 14]
        assert x[:, :3].argmax(1).tolist() == [0, 2]  # red, blue: each id keeps its own photo's features
        skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        # in any order: the pool's threads log them
        assert sorted(re.search(r"/images/(\d+\.jpg)", m).group(1) for m in skipped) == ["11.jpg", "12.jpg", "13.jpg"]
    assert calls == [1, 1]  # chunk [12, 13] had nothing to embed; the second pass embedded nothing


@pytest.fixture
def fake_backbone(monkeypatch):
    """Replaces the embedder in ``lookalike train``; returns the sizes of the batches it embedded."""
    calls = []

    class FakeEmbedder:
        device = "cpu"

        @classmethod
        def from_settings(cls, *args, **kwargs):
            return cls()

        def embed(self, images):
            calls.append(len(images))
            x = mean_colour(images)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

    monkeypatch.setattr(workers.embed, "Embedder", FakeEmbedder)
    return calls


def sample_images(folder, keep=lambda product_id: True, n=40):
    """The first ``n`` sample photos whose id ``keep`` accepts, copied into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in [p for p in sorted((SAMPLE / "images").glob("*.jpg")) if keep(int(p.stem))][:n]:
        shutil.copy(path, folder)
    return folder


def run_train(tmp_path, *args):
    base = ["train", "--styles", str(SAMPLE / "products.csv"), "--out", str(tmp_path / "out"), "--cache",
            str(tmp_path / "cache"), "--hidden", "0", "--min-count", "2"]
    return CliRunner().invoke(app, [*base, *args])


@pytest.mark.parametrize(("setup", "message"), [
    pytest.param(lambda t: ["--images", str(sample_images(t / "images")), "--styles", str(t / "empty.csv")],
                 "empty.csv is empty", id="empty-styles"),
    pytest.param(lambda t: ["--images", str(t / "images")],
                 "no <id>.jpg|jpeg|png|webp photos with a row in styles.csv in", id="no-photos"),
    pytest.param(lambda t: ["--images", str(sample_images(t / "images", lambda i: i % 10 != 1))],
                 "no photo in the early-stopping split (id % 10 == 1)", id="no-early-stopping"),
    pytest.param(lambda t: ["--images", str(sample_images(t / "images", lambda i: i % 10 != 0))],
                 "no photo in the validation split (id % 10 == 0)", id="no-validation"),
    pytest.param(lambda t: ["--images", str(sample_images(t / "images", lambda i: i % 10 in (0, 1)))],
                 "no photo in the training split", id="no-training"),
    pytest.param(lambda t: ["--images", str(sample_images(t / "a" / "imgs", n=20)), "--images",
                            str(sample_images(t / "b" / "imgs", lambda i: i > 10300))],
                 "folders of one name", id="two-folders-one-name"),
    pytest.param(lambda t: ["--images", str(sample_images(t / "images")), "--out", str(t / "empty.csv")],
                 "empty.csv is a file", id="out-is-a-file"),
])
def test_bad_input_stops_train_before_anything_is_embedded(tmp_path, fake_backbone, setup, message):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "images").mkdir(exist_ok=True)
    result = run_train(tmp_path, *setup(tmp_path))
    assert result.exit_code == 1 and type(result.exception) is SystemExit, result.output  # no traceback
    assert message in " ".join(result.output.split())
    assert fake_backbone == []


def test_train_skips_a_photo_it_cannot_read_and_counts_it(tmp_path, fake_backbone):
    images = sample_images(tmp_path / "images")
    broken = sorted((SAMPLE / "images").glob("*.jpg"))[40].name  # has a row in products.csv
    (images / broken).write_text("not a photo")
    result = run_train(tmp_path, "--images", str(images))
    assert result.exit_code == 0, result.output
    assert "1 photo(s) could not be read" in result.output
    assert fake_backbone == [40]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n_skipped"] == 1
