import base64

import pytest
from pydantic import ValidationError

from schemas.events import CatalogEvent, ImageRef


def upsert(**changes) -> dict:
    event = {"op": "upsert", "product_id": 15970, "version": 1, "title": "Turtle Check Men Navy Blue Shirt",
             "master_category": "Apparel", "image": {"data": base64.b64encode(b"jpeg").decode()}}
    return {**event, **changes}


def test_upsert_round_trips_and_keys_by_product_id():
    event = CatalogEvent.model_validate(upsert())
    assert event.key() == b"15970"
    assert event.image.decoded() == b"jpeg"
    assert CatalogEvent.model_validate_json(event.model_dump_json()) == event


@pytest.mark.parametrize("changes, complaint", [
    ({"image": None}, "an upsert needs image"),
    ({"title": "  "}, "an upsert needs title"),
    ({"product_id": 0}, "greater than or equal to 1"),
    ({"op": "merge"}, "'upsert' or 'delete'"),
    ({"image": {"url": "http://x/1.jpg", "data": "eA=="}}, "exactly one of url, path or data"),
    ({"image": {"url": "", "data": "eA=="}}, "exactly one of url, path or data"),  # an empty field is a field given
    ({"image": {"path": " "}}, "image.path is empty"),
    ({"image": {"data": ""}}, "image.data is empty"),
    # What PostgreSQL cannot store: refused here (dead-lettered), not failing the indexer's write.
    ({"title": "a\x00b"}, "contains a NUL character"),
    ({"image": {"path": "/srv/a\x00.jpg"}}, "contains a NUL character"),
    ({"master_category": "x" * 201}, "at most 200 characters"),  # over its btree index's row limit at 3,000
    ({"product_id": 2**63}, "less than or equal to 9223372036854775807"),
    ({"version": 2**63}, "less than or equal to 9223372036854775807"),
    ({"year": 2**31}, "less than or equal to 9999"),
    ({"title": "\ud800"}, "unicode"),
])
def test_invalid_events_say_what_is_wrong(changes, complaint):
    with pytest.raises(ValidationError, match=complaint):
        CatalogEvent.model_validate(upsert(**changes))


def test_delete_needs_only_id_and_version():
    assert CatalogEvent(op="delete", product_id=3, version=9).image is None


def test_bad_base64_is_a_value_error():
    with pytest.raises(ValueError, match="not valid base64"):
        ImageRef(data="not base64!").decoded()
