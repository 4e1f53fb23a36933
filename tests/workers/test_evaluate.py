"""``lookalike eval`` on a small slice of the bundled sample."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from typer.testing import CliRunner

from ops.cli import app
from tests.conftest import SAMPLE
from workers import evaluate as evaluate_module
from workers.classify import CategoryHeads
from workers.evaluate import evaluate
from workers.train import photos, read_styles

KEYS = {"precision_at_k", "exact_recall_at_1", "exact_recall_at_k", "category_accuracy", "images_per_s", "n_queries"}


@pytest.fixture(scope="module")
def sample_slice(tmp_path_factory):
    """40 catalog photos; 10 queries: 5 of them catalog photos, 5 sample queries (not in the catalog)."""
    root = tmp_path_factory.mktemp("eval")
    (root / "catalog").mkdir()
    (root / "queries").mkdir()
    lines = (SAMPLE / "products.csv").read_text().splitlines()
    lines += (SAMPLE / "queries.csv").read_text().splitlines()[1:]
    (root / "styles.csv").write_text("\n".join(lines) + "\n")
    labels = read_styles(root / "styles.csv")
    catalog = photos(SAMPLE / "images", labels)[::30][:40]
    for p in catalog:
        shutil.copy(p, root / "catalog")
    for p in catalog[:5] + photos(SAMPLE / "queries", labels)[:5]:
        shutil.copy(p, root / "queries")
    return root


def test_eval_scores_retrieval_and_categories(sample_slice, embedder):
    result = evaluate(sample_slice / "catalog", sample_slice / "styles.csv", sample_slice / "queries", k=3,
                      embedder=embedder)
    assert KEYS <= set(result)
    assert (result["n_queries"], result["n_catalog"], result["k"]) == (10, 40, 3)
    assert result["exact_recall_at_1"] == result["exact_recall_at_k"] == 1.0  # the same photo is its own 1-NN
    assert set(result["precision_at_k"]) == set(result["category_accuracy"]) == {
        "master_category", "sub_category", "article_type"}
    assert result["precision_at_k"]["master_category"] >= 0.6
    assert result["category_accuracy"]["master_category"] >= 0.9
    assert set(result["category_accuracy_heads"]) == set(result["category_accuracy"])
    assert result["images_per_s"] > 0


def test_a_querys_own_product_never_votes_for_its_category(sample_slice, embedder, tmp_path):
    """A query that is a catalog photo is voted on by the other catalog photos only."""
    seen = []

    class Recording(CategoryHeads):
        def predict(self, features, top=3, neighbours=None):
            seen.extend(neighbours or [])
            return super().predict(features, top, neighbours)

    for name in ("catalog", "queries"):
        (tmp_path / name).mkdir()
    catalog = sorted((sample_slice / "catalog").iterdir())[:3]
    for path in catalog:
        shutil.copy(path, tmp_path / "catalog")
    shutil.copy(catalog[0], tmp_path / "queries")
    result = evaluate(tmp_path / "catalog", sample_slice / "styles.csv", tmp_path / "queries", k=1, embedder=embedder,
                      heads=Recording())
    assert result["exact_recall_at_1"] == 1.0  # its own photo is in the catalog, and found
    assert len(seen) == 1 and len(seen[0]) == 2  # the two other photos voted, not its own
    others = [read_styles(sample_slice / "styles.csv")[int(p.stem)] for p in catalog[1:]]
    assert sorted(labels["article_type"] for _, labels in seen[0]) == sorted(o["article_type"] for o in others)
    assert all(score < 0.999 for score, _ in seen[0])


def test_eval_json_prints_one_object(sample_slice, monkeypatch):
    seen = {}

    def fake(catalog_images, styles, queries, k, embedder=None, heads=None, catalog_cache=None, segment=True,
             votes=True):
        seen.update(catalog=catalog_images, k=k, segment=segment, votes=votes, bfloat16=embedder.bfloat16)
        return {"precision_at_k": {"article_type": 0.5}, "exact_recall_at_1": None, "exact_recall_at_k": None,
                "category_accuracy": {"article_type": 0.9}, "category_accuracy_heads": {"article_type": 0.8},
                "images_per_s": 12.0, "n_queries": 10, "n_catalog": 40, "k": k}

    monkeypatch.setattr(evaluate_module, "evaluate", fake)
    monkeypatch.setenv("LOOKALIKE_CPU_BFLOAT16", "off")  # the model as the workers' settings say
    monkeypatch.setenv("LOOKALIKE_DEVICE", "cpu")
    result = CliRunner().invoke(app, ["eval", "--catalog-images", str(sample_slice / "catalog"), "--styles",
                                      str(sample_slice / "styles.csv"), "--queries", str(sample_slice / "queries"),
                                      "--k", "7", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_queries"] == 10 and seen["k"] == 7 and seen["segment"] is True
    assert seen["votes"] is True and seen["bfloat16"] is False
    table = CliRunner().invoke(app, ["eval", "--catalog-images", str(sample_slice / "catalog"), "--styles",
                                     str(sample_slice / "styles.csv"), "--queries", str(sample_slice / "queries")])
    assert table.exit_code == 0 and "precision@5" in table.output and "n/a" in table.output
    assert "heads alone" in table.output
    CliRunner().invoke(app, ["eval", "--catalog-images", str(sample_slice / "catalog"), "--styles",
                             str(sample_slice / "styles.csv"), "--queries", str(sample_slice / "queries"), "--no-votes"])
    assert seen["votes"] is False


def test_eval_json_is_all_of_stdout_and_unreadable_photos_are_skipped(sample_slice, monkeypatch, tmp_path, caplog):
    """The real backbone (its package prints to stdout as it loads); the catalog is also the queries, with a
    file that is not a photo and a folder named like one."""
    folder = tmp_path / "catalog"
    folder.mkdir()
    catalog = sorted((sample_slice / "catalog").iterdir())
    for path in catalog[:3]:
        shutil.copy(path, folder)
    (folder / catalog[3].name).write_text("not a photo")
    (folder / catalog[4].name).mkdir()
    monkeypatch.setenv("LOOKALIKE_CPU_BFLOAT16", "off")
    monkeypatch.setenv("LOOKALIKE_DEVICE", "cpu")
    result = CliRunner().invoke(app, ["eval", "--catalog-images", str(folder), "--styles",
                                      str(sample_slice / "styles.csv"), "--queries", str(folder), "--k", "2", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert KEYS <= set(figures)
    assert (figures["n_queries"], figures["n_catalog"], figures["n_skipped"]) == (3, 3, 4)
    assert figures["exact_recall_at_1"] == 1.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(catalog[3].name in m or catalog[4].name in m for m in warnings) == 4  # as a catalog photo and a query
    assert any(m.startswith("--queries is the catalog folder: ") for m in warnings)


class Unused:
    """An embedder that must not be used."""

    dim = 1280

    @classmethod
    def from_settings(cls, *args, **kwargs):
        return cls()

    def __getattr__(self, name):
        raise AssertionError(f"the embedder's {name} was used")


@pytest.mark.parametrize(("args", "message"), [
    pytest.param(lambda s, t: ["--styles", str(t / "noid.csv")], "noid.csv line 1: no id column", id="no-id-column"),
    pytest.param(lambda s, t: ["--catalog-images", str(t)],
                 "no <id>.jpg|jpeg|png|webp photos with a row in styles.csv in", id="empty-catalog"),
    pytest.param(lambda s, t: ["--queries", str(t)], "no <id>.jpg|jpeg|png|webp photos", id="empty-queries"),
    pytest.param(lambda s, t: ["--heads", str(t)], "has no heads.safetensors, labels.json, config.json",
                 id="not-heads"),
])
def test_eval_refuses_bad_input_before_embedding(sample_slice, monkeypatch, tmp_path, args, message):
    import workers.embed

    monkeypatch.setattr(workers.embed, "Embedder", Unused)
    (tmp_path / "noid.csv").write_text("gender,masterCategory,subCategory,articleType\nMen,Apparel,Topwear,Tshirts\n")
    base = {"--catalog-images": str(sample_slice / "catalog"), "--styles": str(sample_slice / "styles.csv"),
            "--queries": str(sample_slice / "queries")}
    given = args(sample_slice, tmp_path)
    base.update(zip(given[::2], given[1::2]))
    result = CliRunner().invoke(app, ["eval", *(x for option in base.items() for x in option)])
    assert result.exit_code == 1 and type(result.exception) is SystemExit, result.output  # no traceback
    assert message in " ".join(result.output.split())
