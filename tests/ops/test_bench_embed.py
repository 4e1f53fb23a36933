"""The filler of ``lookalike bench embed``'s catalog-scale Celery part, on the real PostgreSQL."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import sqlalchemy as sa

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
