"""``POST /v1/jobs`` as JSON and with options, and the long-poll, against real Redis (no worker:
the queued Celery message is read back from the ``vision`` list to check the task payload)."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.jobs import FORM_OVERHEAD_BYTES
from schemas.api import Box, SearchResult
from schemas.jobs import QUEUED_KEY, QUEUED_MESSAGES_KEY, JobStore, upload_key
from schemas.settings import GatewaySettings
from schemas.tasks import QUEUE_VISION, TASK_EMBED, EmbedTask
from tests.gateway.conftest import queued_task
from tests.gateway.test_app import jpeg


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_json_base64_is_stored_like_an_upload_with_its_options(client, rclient):
    options = {"k": 3, "crop": {"x": 4, "y": 8, "w": 32, "h": 40},
               "filters": {"gender": ["Men", "Unisex"], "season": "Summer", "year": {"gte": 2011, "lte": 2013}},
               "category": {"level": "article_type", "value": "Shirts"}, "exclude_ids": [15970, 39386]}
    response = client.post("/v1/jobs", json={"image_base64": b64(jpeg()), **options})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert rclient.get(upload_key(job_id)) == jpeg()
    task = queued_task(rclient)
    assert task.job_id == job_id and task.image_url is None and task.product_id is None
    assert task.model_dump(include=set(options), mode="json", exclude_none=True) == {
        **options, "filters": {**options["filters"]}}


def test_json_image_url_is_left_for_the_worker_to_fetch(client, rclient):
    response = client.post("/v1/jobs", json={"image_url": "https://images.example.com/shirt.jpg"})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert rclient.get(upload_key(job_id)) is None
    task = queued_task(rclient)
    assert (task.image_url, task.k) == ("https://images.example.com/shirt.jpg", 10)


def test_multipart_takes_the_same_options_as_json_text(client, rclient):
    response = client.post("/v1/jobs", files={"image": ("shirt.jpg", jpeg())},
                           data={"k": "4", "crop": '{"x": 0, "y": 0, "w": 10, "h": 10}',
                                 "filters": '{"base_colour": "Navy Blue"}', "exclude_ids": "[7]",
                                 "category": '{"level": "master_category", "value": "Apparel"}'})
    assert response.status_code == 202, response.text
    task = queued_task(rclient)
    assert task.k == 4 and task.crop == Box(x=0, y=0, w=10, h=10) and task.exclude_ids == [7]
    assert task.filters.base_colour == "Navy Blue" and task.category.value == "Apparel"


@pytest.mark.parametrize("body, status, code, field", [
    ({}, 422, "missing_image", "image_base64"),
    ({"image_base64": "x", "image_url": "https://a/b.jpg"}, 422, "two_images", "image_url"),
    ({"image_base64": "not base64!"}, 400, "invalid_base64", "image_base64"),
    ({"image_base64": b64(b"just text")}, 400, "not_an_image", "image_base64"),
    ({"image_base64": b64(b"\x89PNG" + b"0" * 5000)}, 413, "too_large", "image_base64"),
    ({"image_url": "ftp://example.com/a.jpg"}, 422, "invalid_image_url", "image_url"),
    ({"image_url": "https://a/b.jpg", "k": 101}, 422, "invalid_k", "k"),
    ({"image_url": "https://a/b.jpg", "crop": {"x": -1, "y": 0, "w": 5, "h": 5}}, 422, "invalid_crop", "crop.x"),
    ({"image_url": "https://a/b.jpg", "crop": {"x": 0, "y": 0, "w": 0, "h": 5}}, 422, "invalid_crop", "crop.w"),
    ({"image_url": "https://a/b.jpg", "crop": {"x": True, "y": 0, "w": 5, "h": 5}}, 422, "invalid_crop", "crop.x"),
    ({"image_url": "https://a/b.jpg", "crop": {"x": 0, "y": "2", "w": 5, "h": 5}}, 422, "invalid_crop", "crop.y"),
    ({"image_url": "https://a/b.jpg", "filters": {"colour": "red"}}, 422, "invalid_filters", "filters.colour"),
    ({"image_url": "https://a/b.jpg", "filters": {"gender": []}}, 422, "invalid_filters", "filters.gender"),
    ({"image_url": "https://a/b.jpg", "filters": {"year": {"gte": "soon"}}}, 422, "invalid_filters",
     "filters.year.gte"),
    ({"image_url": "https://a/b.jpg", "filters": {"year": {"gte": 2015, "lte": 2010}}}, 422, "invalid_filters",
     "filters.year"),
    ({"image_url": "https://a/b.jpg", "category": {"level": "colour", "value": "x"}}, 422, "invalid_category",
     "category.level"),
    ({"image_url": "https://a/b.jpg", "exclude_ids": [1, "two"]}, 422, "invalid_exclude_ids", "exclude_ids.1"),
    ({"image_url": "https://a/b.jpg", "surprise": 1}, 422, "invalid_surprise", "surprise"),
    ({"image_url": "https://a/b.jpg", "k": True}, 422, "invalid_k", "k"),  # not read as 1
    ({"image_url": "https://a/b.jpg", "k": "5"}, 422, "invalid_k", "k"),
    ({"image_url": "https://a/b.jpg", "exclude_ids": [True]}, 422, "invalid_exclude_ids", "exclude_ids.0"),
])
def test_bad_json_jobs_name_the_field(client, rclient, body, status, code, field):
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error.get("field")) == (code, field)
    assert error["message"]
    assert rclient.llen(QUEUE_VISION) == 0


def test_category_auto_is_passed_to_the_worker_from_json_and_multipart(client, rclient):
    response = client.post("/v1/jobs", files={"image": ("a.jpg", jpeg())}, data={"category": "auto"})
    assert response.status_code == 202, response.text
    assert queued_task(rclient).category == "auto"
    response = client.post("/v1/jobs", json={"image_url": "https://a/b.jpg", "category": "auto"})
    assert response.status_code == 202, response.text
    assert queued_task(rclient).category == "auto"


def test_bad_multipart_options_name_the_field(client, rclient):
    response = client.post("/v1/jobs", files={"image": ("a.jpg", jpeg())}, data={"filters": "gender=Men"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "filters" and "must be JSON" in response.json()["error"]["message"]
    response = client.post("/v1/jobs", files={"image": ("a.jpg", jpeg())},
                           data={"crop": '{"x": 0, "y": 0, "w": 5}'})
    assert response.json()["error"]["field"] == "crop.h"


@pytest.mark.parametrize("data, code, field", [
    ({"k": "\u00b2"}, "invalid_k", "k"),  # a superscript two: str.isdigit() says yes, int() says no
    ({"k": "9" * 5000}, "invalid_k", "k"),  # past int()'s 4,300 digits
    ({"exclude_id": "[1]"}, "invalid_exclude_id", "exclude_id"),  # misspelt: refused, not searched without
    ({"filter": '{"gender": "Men"}'}, "invalid_filter", "filter"),
])
def test_bad_multipart_fields_are_422_naming_the_field(client, rclient, data, code, field):
    response = client.post("/v1/jobs", files={"image": ("a.jpg", jpeg())}, data=data)
    assert response.status_code == 422, response.text
    assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (code, field)
    assert rclient.llen(QUEUE_VISION) == 0


def test_an_embedding_form_takes_only_its_crop(client, rclient):
    response = client.post("/v1/embeddings", files={"image": ("a.jpg", jpeg())}, data={"k": "5"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_k", response.text
    assert "`crop`" in response.json()["error"]["message"]


def test_the_largest_filters_fit_a_multipart_field(client, rclient):
    filters = {name: [f"{i:03d}" + "x" * 197 for i in range(100)]
               for name in ("gender", "master_category", "sub_category", "article_type")}
    field = json.dumps(filters)
    assert len(field) > 64 * 1024  # Starlette's default part limit
    response = client.post("/v1/jobs", files={"image": ("a.jpg", jpeg())}, data={"filters": field})
    assert response.status_code == 202, response.text
    assert queued_task(rclient).filters.gender == filters["gender"]


def test_a_string_too_long_for_a_filter_says_so(client):
    response = client.post("/v1/jobs", json={"image_url": "https://a/b.jpg", "filters": {"gender": "x" * 201}})
    assert response.status_code == 422
    assert "at most 200 characters" in response.json()["error"]["message"]  # not "should be a valid list"


@pytest.mark.parametrize("method, path, kwargs, status, code", [
    ("get", "/v1/nothing", {}, 404, "not_found"),
    ("delete", "/v1/jobs/abc", {}, 405, "method_not_allowed"),
    ("post", "/v1/jobs", {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}},
     400, "invalid_form"),
])
def test_starlettes_own_errors_are_json_errors_too(client, method, path, kwargs, status, code):
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]


def test_a_json_body_is_cut_off_at_the_limit_even_without_content_length(client):
    def chunks():
        yield b'{"image_base64": "'
        for _ in range(FORM_OVERHEAD_BYTES // 1024 + 100):  # past the photo's base64 and the options' room
            yield b"A" * 1024

    response = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_long_poll_answers_when_the_job_ends(client, gsettings, rclient):
    job_id = client.post("/v1/jobs", files={"image": ("a.jpg", jpeg())}).json()["job_id"]
    store = JobStore(rclient, gsettings.job_ttl_s)
    result = SearchResult(model_version="m", box=Box(x=0, y=0, w=64, h=64), products=[])
    timer = threading.Timer(0.4, store.done, args=(job_id, result, {"embed": 0.1}))
    timer.start()
    start = time.monotonic()
    status = client.get(f"/v1/jobs/{job_id}", params={"wait_s": 3}).json()
    elapsed = time.monotonic() - start
    timer.join()
    assert status["status"] == "done" and status["result"]["model_version"] == "m"
    assert 0.35 <= elapsed < 1.5


def test_long_poll_gives_up_after_wait_s_and_is_bounded(client):
    job_id = client.post("/v1/jobs", files={"image": ("a.jpg", jpeg())}).json()["job_id"]
    start = time.monotonic()
    assert client.get(f"/v1/jobs/{job_id}", params={"wait_s": 0.5}).json()["status"] == "queued"
    assert 0.45 <= time.monotonic() - start < 1.5
    for bad in ("4", "-1", "nan", "soon"):
        response = client.get(f"/v1/jobs/{job_id}", params={"wait_s": bad})
        assert response.status_code == 422 and response.json()["error"]["field"] == "wait_s", bad
    assert client.get("/v1/jobs/nope", params={"wait_s": 1}).status_code == 404


def test_a_full_queue_answers_503_with_retry_after(gsettings, rclient):
    full = GatewaySettings(**{**gsettings.model_dump(), "max_queue_depth": 2, "queue_retry_after_s": 7})
    with TestClient(create_app(full)) as client:
        for _ in range(2):
            assert client.post("/v1/jobs", json={"image_url": "https://a/b.jpg"}).status_code == 202
        response = client.post("/v1/jobs", files={"image": ("a.jpg", jpeg())})
        assert response.status_code == 503 and response.headers["retry-after"] == "7"
        error = response.json()["error"]
        assert error["code"] == "overloaded" and "LOOKALIKE_MAX_QUEUE_DEPTH" in error["message"]
        assert rclient.llen(QUEUE_VISION) == 2
        rclient.lpop(QUEUE_VISION)  # a worker took one
        assert client.post("/v1/jobs", json={"image_url": "https://a/b.jpg"}).status_code == 202
        assert 'lookalike_requests_refused_total{reason="queue_full"}' in client.get("/metrics").text


def test_an_embedding_job_is_queued_by_name_with_its_crop(client, rclient):
    response = client.post("/v1/embeddings",
                           json={"image_base64": b64(jpeg()), "crop": {"x": 1, "y": 2, "w": 30, "h": 40}})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert rclient.get(upload_key(job_id)) == jpeg()
    message = json.loads(rclient.lpop(QUEUE_VISION))
    assert message["headers"]["task"] == TASK_EMBED
    task = EmbedTask.model_validate(json.loads(base64.b64decode(message["body"]))[0][0])
    assert task == EmbedTask(job_id=job_id, crop=Box(x=1, y=2, w=30, h=40))

    response = client.post("/v1/embeddings", files={"image": ("a.jpg", jpeg())},
                           data={"crop": '{"x": 0, "y": 0, "w": 8, "h": 8}'})
    assert response.status_code == 202, response.text
    message = json.loads(rclient.lpop(QUEUE_VISION))
    assert json.loads(base64.b64decode(message["body"]))[0][0]["crop"] == {"x": 0, "y": 0, "w": 8, "h": 8}


@pytest.mark.parametrize("body, code, field", [
    ({"image_url": "https://a/b.jpg", "k": 5}, "invalid_k", "k"),  # a search option: not for embeddings
    ({}, "missing_image", "image_base64"),
    ({"image_url": "https://a/b.jpg", "crop": {"x": 0, "y": 0, "w": 1}}, "invalid_crop", "crop.h"),
])
def test_bad_embedding_requests_name_the_field(client, rclient, body, code, field):
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 422, response.text
    assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (code, field)
    assert rclient.llen(QUEUE_VISION) == 0


def test_a_job_the_broker_refuses_gets_503_and_is_not_kept_for_the_sweep(client, rclient, monkeypatch):
    """Redis gone between storing the job and sending its message: 503 with Retry-After, and the
    job is not left for the lost-message sweep to send (its caller never got its id)."""
    import kombu.exceptions
    from celery import Celery

    def refuse(*args, **kwargs):
        raise kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(Celery, "send_task", refuse)
    response = client.post("/v1/jobs", files={"image": ("shirt.jpg", jpeg())})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable" and response.headers["Retry-After"] == "5"
    assert rclient.zcard(QUEUED_KEY) == 0 and rclient.hlen(QUEUED_MESSAGES_KEY) == 0
