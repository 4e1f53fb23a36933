"""``lookalike bench embed``: the filler of its catalog-scale Celery part, on the real PostgreSQL; the
stage timings of its forward rows; its Celery rows, real workers taking turns on the real broker."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from ops import bench_embed
from ops.bench_embed import FILLER_TITLE, fill_catalog
from schemas.events import CatalogEvent, ImageRef
from schemas.tables import product_vectors, products
from workers.catalog import METADATA_FIELDS, count_vectors, load_vectors
from workers.embed import DIM


def test_fill_catalog_tops_the_catalog_up_with_labelled_unit_vectors(engine):
    version = f"filler-{uuid.uuid4().hex[:8]}"
    with engine.connect() as conn:
        first = (conn.execute(sa.select(sa.func.max(products.c.id))).scalar_one() or 0) + 1
    templates = [CatalogEvent(op="upsert", product_id=1, version=7, title="a top", gender="Women",
                              master_category="Apparel", sub_category="Topwear", article_type="Tops",
                              base_colour="Blue", season="Summer", year=2012, usage="Casual",
                              image=ImageRef(path="a.jpg")),
                 CatalogEvent(op="upsert", product_id=2, version=7, title="a watch", gender="Men",
                              master_category="Accessories", sub_category="Watches", article_type="Watches",
                              image=ImageRef(url="https://shop.example/w.jpg"))]
    with engine.begin() as conn:  # a stored product with a vector of this version: the filler tops it up
        conn.execute(products.insert().values(id=first, version=1, title="stored"))
        conn.execute(product_vectors.insert().values(product_id=first, model_version=version, shard=0, dim=DIM,
                                                     vector=np.eye(1, DIM, dtype="<f4").tobytes()))
    try:
        with pytest.raises(ValueError, match="template"):
            fill_catalog(engine, [], version, 4, 26)
        added = fill_catalog(engine, templates, version, 4, 1 + 25, chunk=10)
        assert added == 25 and count_vectors(engine, version) == 26
        assert fill_catalog(engine, templates, version, 4, 26) == 0  # already that big
        with engine.connect() as conn:
            rows = conn.execute(sa.select(products).where(products.c.id > first).order_by(products.c.id)).all()
        assert [row.id for row in rows] == list(range(first + 1, first + 26))
        for row in rows:  # the templates' metadata in turn, titled as filler
            expected = templates[row.id % len(templates)]
            assert row.title == f"{FILLER_TITLE} {row.id}" and row.version == 1 and not row.deleted
            assert row.thumbnail is None and row.image_url == (expected.image.url if expected.image else None)
            assert {f: getattr(row, f) for f in METADATA_FIELDS if f != "title"} == \
                {f: getattr(expected, f) for f in METADATA_FIELDS if f != "title"}
        for shard in range(4):
            for _, ids, vectors in load_vectors(engine, version, shard):
                filler = ids > first
                assert (ids[filler] % 4 == shard).all()
                assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
                assert np.abs(vectors[filler] @ vectors[filler].T - np.eye(filler.sum())).max() < 0.2  # random
    finally:
        with engine.begin() as conn:  # vectors go with their products (ON DELETE CASCADE)
            conn.execute(sa.delete(products).where(products.c.id >= first, products.c.id <= first + 25))


def test_forward_rows_time_the_pipeline_s_stages_within_its_one_caller_run(monkeypatch):
    sample = sorted((Path(__file__).resolve().parents[2] / "ops" / "sample" / "images").glob("*.jpg"))
    monkeypatch.setattr(bench_embed, "photos", lambda n: [p.read_bytes() for p in sample[:n]])
    with pytest.raises(ValueError, match="include 1"):
        bench_embed.forward_rows([2], 1, callers=(2,))
    said = []
    _, (row,) = bench_embed.forward_rows([2], 1, say=said.append)
    assert row.batch == 2 and set(row.raw_per_s) == set(row.pipeline_per_s) == {1, 2}
    assert list(row.stages_ms) == list(bench_embed.STAGES) and all(ms > 0 for ms in row.stages_ms.values())
    # The stages are timed inside the one-caller pipeline's own run: together nearly all of its time an image.
    wall_ms = 1000 / row.pipeline_per_s[1]
    assert 0.8 * wall_ms <= sum(row.stages_ms.values()) <= wall_ms
    assert row.steps_ms == pytest.approx(sum(row.stages_ms.values()) - row.stages_ms["model"])
    assert f"steps around the model {row.steps_ms:.2f}" in said[-1] and f"{1000 / row.raw_per_s[1]:.2f}" in said[-1]


def test_upload_rows_time_whole_and_reduced_decoding_of_large_photos(monkeypatch):
    sample = sorted((Path(__file__).resolve().parents[2] / "ops" / "sample" / "images").glob("*.jpg"))
    monkeypatch.setattr(bench_embed, "photos", lambda n: [p.read_bytes() for p in sample[:n]])
    said = []
    rows = bench_embed.upload_rows([((900, 1200), "JPEG"), ((900, 1200), "PNG")], 1, say=said.append)
    assert [row.format for row in rows] == ["JPEG", "PNG"]
    assert bench_embed.phone_photos(bench_embed.photos(1), (64, 64), fmt="PNG")[0].startswith(b"\x89PNG")
    for row, line in zip(rows, said):
        assert row.size == (900, 1200) and row.decoded == (450, 600)  # 1/2: the long side no less than 448
        assert list(row.whole_ms) == list(row.reduced_ms) == list(bench_embed.UPLOAD_STAGES)
        assert all(ms > 0 for ms in [*row.whole_ms.values(), *row.reduced_ms.values()])
        assert row.ratio == pytest.approx(sum(row.whole_ms.values()) / sum(row.reduced_ms.values()))
        assert all(0.5 < row.cosine[way] <= 1.0001 for way in ("whole", "reduced")), row.cosine  # the same products
        assert f"900x1200 {row.format}" in line and f"{row.ratio:.2f}x" in line


def test_celery_rows_give_each_configuration_its_turn_and_pair_the_rounds(settings, stack, tmp_path):
    """Two real workers (no micro-batching, up to 4) on the real broker, taking turns: every job of a
    row is run by that row's worker (the other has stopped consuming), and the ratios are paired."""
    import redis

    from tests.conftest import drop_queued_jobs

    drop_queued_jobs(redis.Redis.from_url(stack["LOOKALIKE_REDIS_URL"]))
    said = []
    with pytest.raises(ValueError, match="include 1"):
        bench_embed.celery_rows(stack, tmp_path, [4], [1], 1)
    rows = bench_embed.celery_rows(stack, tmp_path, [1, 4], [1, 2, 4], 2, rounds=2, min_jobs=6, say=said.append)
    assert sorted((row.batch_size, row.submitters) for row in rows) == [(b, s) for b in (1, 4) for s in (1, 2, 4)]
    for row in rows:  # 2 jobs a submitter, at least 6 a row (6 at 1 submitter, 3 each at 2), 2 rounds
        assert row.failed == 0 and row.ran == {1: 6, 2: 6, 4: 8}[row.submitters] * 2, row
        assert row.jobs_per_s > 0 and 0 < row.p50_ms <= row.p95_ms
        assert row.vs_off == 1.0 if row.batch_size == 1 else row.vs_off > 0
    assert [line.split(":")[0] for line in said] == ["  round 1 of 2, jobs/s at job batch 1 / 4",
                                                     "  round 2 of 2, jobs/s at job batch 1 / 4"]
