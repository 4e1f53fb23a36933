"""``GET /v1/products/{id}`` and ``/similar`` against real PostgreSQL and Redis (no worker: the
"more like this" job stays queued here; tests/test_end_to_end.py runs it through a worker)."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from schemas.tables import products
from tests.gateway.conftest import queued_task

PRODUCT_ID = 7_000_001


@pytest.fixture
def product(engine):
    row = {"id": PRODUCT_ID, "version": 5, "title": "Navy Shirt", "gender": "Men", "master_category": "Apparel",
           "sub_category": "Topwear", "article_type": "Shirts", "base_colour": "Navy Blue", "season": "Fall",
           "year": 2012, "usage": "Casual"}
    with engine.begin() as conn:
        conn.execute(sa.delete(products).where(products.c.id == PRODUCT_ID))
        conn.execute(sa.insert(products).values(row))
    yield row
    with engine.begin() as conn:
        conn.execute(sa.delete(products).where(products.c.id == PRODUCT_ID))


def test_a_product_is_served_as_json(client, product):
    response = client.get(f"/v1/products/{PRODUCT_ID}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {**{k: v for k, v in product.items() if k != "id"}, "product_id": PRODUCT_ID,
                    "image_url": f"/v1/products/{PRODUCT_ID}/image"}


def test_unknown_and_deleted_products_are_404(client, product, engine):
    response = client.get("/v1/products/6999999")
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_product"
    with engine.begin() as conn:
        conn.execute(sa.update(products).where(products.c.id == PRODUCT_ID).values(deleted=True))
    assert client.get(f"/v1/products/{PRODUCT_ID}").status_code == 404
    assert client.get(f"/v1/products/{PRODUCT_ID}/similar").status_code == 404


def test_similar_queues_a_search_by_product_and_waits(client, product, rclient):
    start = time.monotonic()
    response = client.get(f"/v1/products/{PRODUCT_ID}/similar",
                          params=[("k", "4"), ("gender", "Men"), ("gender", "Unisex"), ("year_gte", "2010"),
                                  ("category_level", "sub_category"), ("category_value", "Topwear"),
                                  ("exclude_id", "3"), ("wait_s", "0.3")])
    assert time.monotonic() - start >= 0.25
    assert response.status_code == 202, response.text  # no worker here: still queued after wait_s
    assert response.headers["location"].endswith(f"/v1/jobs/{response.json()['job_id']}")
    task = queued_task(rclient)
    assert (task.product_id, task.k, task.exclude_ids, task.image_url) == (PRODUCT_ID, 4, [3], None)
    assert task.filters.gender == ["Men", "Unisex"] and task.filters.year.gte == 2010
    assert (task.category.level, task.category.value) == ("sub_category", "Topwear")


@pytest.mark.parametrize("params, field", [
    ({"k": "0"}, "k"), ({"year_gte": "soon"}, "year_gte"), ({"exclude_id": "x"}, "exclude_id"),
    ({"category_level": "colour", "category_value": "x"}, "category_level"),
    ({"category_value": "Shirts"}, "category_level"), ({"wait_s": "999"}, "wait_s"),
    # Not parameters of /similar: refused, not searched without (a photo's options, a misspelling).
    ({"category": "auto"}, "category"), ({"exclude_ids": "5"}, "exclude_ids"), ({"colour": "red"}, "colour"),
])
def test_bad_similar_parameters_name_the_parameter(client, product, rclient, params, field):
    response = client.get(f"/v1/products/{PRODUCT_ID}/similar", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert rclient.llen("vision") == 0
