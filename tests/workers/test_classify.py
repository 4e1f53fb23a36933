"""Category heads: the shipped default on real photos, the ``auto`` rule, and training on made-up features."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests.conftest import SAMPLE
from workers.classify import KNN_K, KNN_MIN_SIMILARITY, KNN_TAU, KNN_WEIGHT, LEVELS, OTHER, CategoryHeads, auto_category
from workers.decode import decode
from workers.train import read_styles, train


@pytest.fixture(scope="module")
def heads() -> CategoryHeads:
    model = CategoryHeads()
    model.load()
    model.load()  # idempotent
    return model


def test_the_shipped_heads_predict_the_top_3_per_level_as_probabilities(heads):
    features = np.random.default_rng(0).normal(size=(4, 1280)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    predicted = heads.predict(features)
    assert len(predicted) == 4
    for image in predicted:
        assert set(image) == set(LEVELS)
        for top in image.values():
            probs = [p for _, p in top]
            assert len(top) == 3 and probs == sorted(probs, reverse=True) and 0 <= sum(probs) <= 1 + 1e-6
    assert all(abs(p.sum(1) - 1).max() < 1e-4 for p in heads.probabilities(features).values())


def test_the_shipped_heads_know_the_sample_queries(heads, embedder):
    """30 query photos of products the sample catalog does not hold (some in the heads' training split; many of
    rare article types, which the heads fold into "other")."""
    with open(SAMPLE / "queries.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    vectors = embedder.embed([decode((SAMPLE / "queries" / f"{r['id']}.jpg").read_bytes(), 1 << 24) for r in rows])
    predicted = heads.predict(vectors)
    columns = {"master_category": "masterCategory", "sub_category": "subCategory", "article_type": "articleType"}
    accuracy = {level: np.mean([p[level][0][0] == r[col] for p, r in zip(predicted, rows)])
                for level, col in columns.items()}
    assert accuracy["master_category"] >= 0.95 and accuracy["sub_category"] >= 0.9
    assert accuracy["article_type"] >= 0.6, accuracy  # the sample keeps rare types, folded into "other"


@pytest.mark.parametrize("probs, expected", [
    ((0.99, 0.97, 0.9), ("article_type", "Shirts")),
    ((0.99, 0.97, 0.3), ("sub_category", "Topwear")),
    ((0.99, 0.2, 0.3), ("master_category", "Apparel")),
    ((0.4, 0.2, 0.3), None),
])
def test_auto_takes_the_most_specific_level_that_is_sure_enough(probs, expected):
    prediction = {"master_category": [("Apparel", probs[0])], "sub_category": [("Topwear", probs[1])],
                  "article_type": [("Shirts", probs[2])]}
    assert auto_category(prediction, 0.5) == expected


def test_votes_weigh_each_neighbour_by_its_similarity(heads):
    """exp((s - s_max) / KNN_TAU): a neighbour 0.02 less similar than the best counts e^-1 as much; unknown
    labels count for "other", unlabelled neighbours and those past KNN_K not at all."""
    found = [(0.90, {"article_type": "Shirts"}), (0.88, {"article_type": "Jeans"}),
             (0.88, {"article_type": "No Such Type"}), (0.87, {"article_type": None})]
    found += [(0.5, {"article_type": "Watches"})] * KNN_K  # beyond the first KNN_K
    far = [(KNN_MIN_SIMILARITY - 0.01, {"article_type": "Shirts"})]  # unlike anything in the catalog
    votes = heads.votes("article_type", [found, [], far])
    names = heads.labels["article_type"]
    weights = {"Shirts": 1.0, "Jeans": np.exp(-0.02 / KNN_TAU), OTHER: np.exp(-0.02 / KNN_TAU)}
    weights["Watches"] = (KNN_K - 4) * np.exp(-0.4 / KNN_TAU)
    total = sum(weights.values())
    for name, weight in weights.items():
        assert votes[0, names.index(name)] == pytest.approx(weight / total, rel=1e-5)
    assert votes[0].sum() == pytest.approx(1.0) and not votes[1].any() and not votes[2].any()


def test_the_catalogs_votes_move_the_prediction_and_nothing_else(heads):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(3, 1280)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    alone = heads.probabilities(features)
    neighbours = [[(0.95, {"master_category": "Footwear", "sub_category": "Shoes", "article_type": "Casual Shoes"})] * 3,
                  [],  # no neighbours: the heads alone
                  [(0.9, {"master_category": None})]]  # nobody labelled: the heads alone
    blended = heads.probabilities(features, neighbours)
    for level, p in blended.items():
        assert np.allclose(p.sum(axis=1), 1, atol=1e-5)
        assert np.array_equal(p[1:], alone[level][1:])
        voted = heads.labels[level].index(neighbours[0][0][1][level])
        assert p[0, voted] == pytest.approx((1 - KNN_WEIGHT) * alone[level][0, voted] + KNN_WEIGHT, rel=1e-5)
    top = heads.predict(features, neighbours=neighbours)[0]
    assert [top[level][0][0] for level in LEVELS] == ["Footwear", "Shoes", "Casual Shoes"]


def test_auto_never_restricts_to_other():
    prediction = {"master_category": [("Apparel", 0.99)], "article_type": [(OTHER, 0.99)]}
    assert auto_category(prediction, 0.5) == ("master_category", "Apparel")


def test_training_keeps_the_validation_split_out_and_folds_rare_labels(tmp_path):
    """Three separable made-up classes plus a rare one; what is written loads and scores as reported."""
    rng = np.random.default_rng(0)
    ids = np.arange(1000, 1600, dtype=np.int64)
    kinds = np.array(["Shirts", "Jeans", "Watches"])[ids % 3]
    kinds[:4] = "Rare"  # 4 rows: under min_count, folded into "other"
    centres = {k: rng.normal(size=16) for k in set(kinds)}
    x = np.stack([centres[k] + 0.3 * rng.normal(size=16) for k in kinds]).astype(np.float32)
    styles_csv = tmp_path / "styles.csv"
    with open(styles_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "masterCategory", "subCategory", "articleType"])
        writer.writerows([i, "Apparel" if k != "Watches" else "Accessories", k, k] for i, k in zip(ids, kinds))
    metrics = train({"made-up": (ids, x)}, read_styles(styles_csv), tmp_path / "heads", hidden=0, min_count=5,
                    max_epochs=30, batch=32, lr=1e-2)
    labels = json.loads((tmp_path / "heads" / "labels.json").read_text())
    assert labels["article_type"] == ["Jeans", "Shirts", "Watches", OTHER]
    assert metrics["validation"]["made-up"]["n"] == 60
    assert metrics["train_rows"] == 480 and metrics["early_stop_rows"] == 60
    assert metrics["validation"]["made-up"]["article_type"] >= 0.95
    assert json.loads((tmp_path / "heads" / "metrics.json").read_text()) == metrics
    heads = CategoryHeads(tmp_path / "heads")
    assert heads.predict(x[:1])[0]["master_category"][0][0] in ("Apparel", "Accessories")


def test_the_train_command_caches_features_and_writes_the_heads(tmp_path, monkeypatch):
    """``lookalike train`` end to end with a fake backbone (features from the mean colour), twice: the second
    run reads the feature cache."""
    import shutil

    from typer.testing import CliRunner

    import workers.embed
    from ops.cli import app

    calls = []

    class FakeEmbedder:
        def __init__(self, *args, **kwargs) -> None:
            self.device = "cpu"

        @classmethod
        def from_settings(cls, *args, **kwargs) -> FakeEmbedder:
            return cls()

        def embed(self, images):
            calls.append(len(images))
            x = np.stack([np.resize(image.reshape(-1, 3).mean(0), 1280) for image in images]).astype(np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

    monkeypatch.setattr(workers.embed, "Embedder", FakeEmbedder)
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((SAMPLE / "images").glob("*.jpg"))[:40]:
        shutil.copy(path, images)
    args = ["train", "--images", str(images), "--styles", str(SAMPLE / "products.csv"), "--out",
            str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--hidden", "0", "--min-count", "2"]
    for _ in range(2):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    assert calls == [40]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"heads.safetensors", "labels.json", "config.json",
                                                              "metrics.json"}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["validation"]["images"]["n"] >= 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["segmented"] is True
    assert (tmp_path / "cache" / "images-segmented").is_dir()  # features of segmented photos, cached apart
