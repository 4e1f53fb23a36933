"""``POST /v1/products`` and ``DELETE /v1/products/{id}`` behind API keys, publishing to the real
broker (the events are read back from ``catalog.products``)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time

import pytest
from kafka import KafkaConsumer, TopicPartition
from starlette.testclient import TestClient

from gateway.app import create_app
from schemas.settings import GatewaySettings
from tests.gateway.test_app import jpeg

KEY = "k3y-" + "7f" * 16
PRODUCT_ID = 7_100_001


@pytest.fixture
def writer(gsettings):
    digests = [hashlib.sha256(KEY.encode()).hexdigest()]
    settings = GatewaySettings(**{**gsettings.model_dump(), "api_key_sha256": digests})
    with TestClient(create_app(settings)) as client:
        yield client


def product(product_id: int = PRODUCT_ID, **changes) -> dict:
    """A product body; a change to None leaves that field out."""
    body = {"product_id": product_id, "version": 11, "title": "Navy Shirt", "master_category": "Apparel",
            "gender": "Men", "year": 2012, "image": {"data": base64.b64encode(jpeg()).decode()}, **changes}
    return {name: value for name, value in body.items() if value is not None}


def events_for(settings, product_ids: set[int]) -> list[dict]:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    consumer.assign([TopicPartition(settings.products_topic, p) for p in range(settings.partitions)])
    found = [json.loads(r.value) | {"_key": r.key.decode()} for r in consumer if int(r.key) in product_ids]
    consumer.close()
    return found


def test_writes_need_a_valid_key(writer):
    response = writer.post("/v1/products", json=product())
    assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    response = writer.post("/v1/products", json=product(), headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert writer.delete(f"/v1/products/{PRODUCT_ID}", headers={"X-API-Key": KEY[:-1]}).status_code == 401


@pytest.mark.parametrize("overrides", [{}, {"read_only": True}])
def test_a_read_only_deployment_refuses_writes(gsettings, overrides):
    digests = [] if not overrides else [hashlib.sha256(KEY.encode()).hexdigest()]
    settings = GatewaySettings(**{**gsettings.model_dump(), "api_key_sha256": digests, **overrides})
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/products", json=product(), headers={"X-API-Key": KEY})
        assert response.status_code == 403 and response.json()["error"]["code"] == "read_only"
        assert client.delete(f"/v1/products/{PRODUCT_ID}", headers={"X-API-Key": KEY}).status_code == 403


def test_placeholder_or_raw_keys_in_settings_are_refused_at_start():
    with pytest.raises(ValueError, match="placeholder key 'changeme'"):
        GatewaySettings(api_key_sha256=[hashlib.sha256(b"changeme").hexdigest()])
    with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
        GatewaySettings(api_key_sha256=[KEY])


def test_upserts_and_deletes_are_published_keyed_by_product(writer, settings):
    ids = {PRODUCT_ID + 1, PRODUCT_ID + 2, PRODUCT_ID + 3}
    one = writer.post("/v1/products", json=product(PRODUCT_ID + 1), headers={"Authorization": f"Bearer {KEY}"})
    assert one.status_code == 202, one.text
    assert one.json()["changes"] == [{"product_id": PRODUCT_ID + 1, "version": 11}]
    by_url = product(PRODUCT_ID + 3, image={"url": "https://images.example.com/a.jpg"})
    batch = writer.post("/v1/products", json=[product(PRODUCT_ID + 2, version=None), by_url],
                        headers={"X-API-Key": KEY})
    assert batch.status_code == 202, batch.text
    default_version = batch.json()["changes"][0]["version"]
    assert default_version > 1_700_000_000_000  # now, in ms
    gone = writer.delete(f"/v1/products/{PRODUCT_ID + 1}", params={"version": 12}, headers={"X-API-Key": KEY})
    assert gone.status_code == 202 and gone.json()["op"] == "delete"

    events = events_for(settings, ids)
    by_id = {}
    for event in events:
        by_id.setdefault(event["product_id"], []).append(event)
        assert event["_key"] == str(event["product_id"])
    assert [e["op"] for e in by_id[PRODUCT_ID + 1]] == ["upsert", "delete"]  # one partition, in order
    assert by_id[PRODUCT_ID + 1][1]["version"] == 12
    assert by_id[PRODUCT_ID + 2][0]["version"] == default_version
    assert base64.b64decode(by_id[PRODUCT_ID + 2][0]["image"]["data"]) == jpeg()
    assert by_id[PRODUCT_ID + 3][0]["image"] == {"url": "https://images.example.com/a.jpg"}  # the indexer fetches it


@pytest.mark.parametrize("body, status, code, field", [
    (product(image={"path": "/etc/passwd"}), 422, "invalid_image", "image"),
    (product(image={"url": "file:///etc/passwd"}), 422, "invalid_image_url", "image.url"),
    ([product(), product(image={"data": "!!"})], 422, "invalid_base64", "1.image.data"),
    (product(image={"data": base64.b64encode(b"text").decode()}), 400, "not_an_image", "image.data"),
    (product(title=None), 422, "invalid_request", None),
    (product(year=20000), 422, "invalid_year", "year"),
    ([], 422, "invalid_request", None),
    # What the indexer could not store: refused here, not published (they stopped its partition).
    (product(title="a\x00b"), 422, "invalid_title", "title"),
    (product(master_category="x" * 3000), 422, "invalid_master_category", "master_category"),
])
def test_bad_products_are_refused_naming_the_field(writer, body, status, code, field):
    response = writer.post("/v1/products", json=body, headers={"X-API-Key": KEY})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error.get("field")) == (code, field), error


def test_each_key_is_rate_limited_per_minute(gsettings):
    key, other = secrets.token_hex(16), secrets.token_hex(16)  # counters of their own in the shared Redis
    digests = [hashlib.sha256(k.encode()).hexdigest() for k in (key, other)]
    settings = GatewaySettings(**{**gsettings.model_dump(), "api_key_sha256": digests, "write_rate_per_min": 2})
    with TestClient(create_app(settings)) as client:
        if 60 - time.time() % 60 < 3:  # keep the three requests in one window
            time.sleep(60 - time.time() % 60)
        bad = {"product_id": 1}  # counted before validation: a refused body still costs a request
        assert [client.post("/v1/products", json=bad, headers={"X-API-Key": key}).status_code
                for _ in range(2)] == [422, 422]
        response = client.post("/v1/products", json=bad, headers={"X-API-Key": key})
        assert response.status_code == 429, response.text
        assert response.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert client.delete("/v1/products/5", headers={"X-API-Key": key}).status_code == 429
        assert client.post("/v1/products", json=bad, headers={"X-API-Key": other}).status_code == 422  # its own


def test_a_lone_surrogate_is_a_422_not_a_500(writer):
    body = json.dumps(product()).replace('"title": "', '"title": "\\ud800', 1)
    response = writer.post("/v1/products", content=body, headers={"X-API-Key": KEY, "content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "title"
