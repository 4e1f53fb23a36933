"""The gateway against real Redis, PostgreSQL and Kafka (no worker: jobs stay queued here)."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest
import redis
from PIL import Image
from starlette.testclient import TestClient

from gateway.app import create_app
from schemas.jobs import JobStore, ReplicaStatus, job_key, upload_key
from schemas.settings import GatewaySettings
from schemas.tasks import QUEUE_VISION
from tests.conftest import drop_queued_jobs


def jpeg(size=(64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "navy").save(out, format="JPEG")
    return out.getvalue()


def test_submit_stores_the_upload_and_queues_a_task(client, gsettings):
    response = client.post("/v1/jobs", files={"image": ("shirt.jpg", jpeg())}, data={"k": "7"})
    assert response.status_code == 202
    body = response.json()
    assert body["status_url"].endswith(f"/v1/jobs/{body['job_id']}")
    assert response.headers["location"] == body["status_url"]
    store = redis.Redis.from_url(gsettings.redis_url)
    assert store.get(upload_key(body["job_id"])) == jpeg()
    assert 0 < store.ttl(job_key(body["job_id"])) <= gsettings.job_ttl_s
    assert store.llen(QUEUE_VISION) == 1

    status = client.get(body["status_url"]).json()
    assert status["status"] == "queued" and status["result"] is None


def test_unknown_job_is_404(client):
    response = client.get("/v1/jobs/doesnotexist")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_job"


@pytest.mark.parametrize("files, data, status, code, field", [
    ({"image": ("notes.txt", b"this is not a photo")}, {}, 400, "not_an_image", "image"),
    ({"image": ("empty.jpg", b"")}, {}, 400, "empty", "image"),
    ({"image": ("big.png", b"\x89PNG" + b"0" * 5000)}, {}, 413, "too_large", "image"),
    ({"image": ("shirt.jpg", jpeg())}, {"k": "0"}, 422, "invalid_k", "k"),
    ({"image": ("shirt.jpg", jpeg())}, {"k": "ten"}, 422, "invalid_k", "k"),
    ({"photo": ("shirt.jpg", jpeg())}, {}, 422, "missing_image", "image"),
])
def test_bad_uploads_are_refused_naming_the_problem(client, files, data, status, code, field):
    response = client.post("/v1/jobs", files=files, data=data)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"]


def test_other_content_types_are_refused_with_how_to_send(client):
    response = client.post("/v1/jobs", content=jpeg(), headers={"content-type": "image/jpeg"})
    assert response.status_code == 415
    message = response.json()["error"]["message"]
    assert "multipart/form-data" in message and "image_base64" in message and "image_url" in message


def test_health_readiness_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"postgres": "ok", "redis": "ok", "kafka": "ok"}
    assert isinstance(ready.json()["workers"], list)


def test_readiness_says_how_far_behind_each_worker_is(client, gsettings):
    store = JobStore(redis.Redis.from_url(gsettings.redis_url), gsettings.job_ttl_s)
    store.report_replica(ReplicaStatus(worker="catching-up", model_version="m", ntotal=40, shard_sizes=[10] * 4,
                                       lag=12, updated_at=time.time()))
    workers = {w["worker"]: w for w in client.get("/readyz").json()["workers"]}
    assert workers["catching-up"]["lag"] == 12 and workers["catching-up"]["vectors"] == 40
    metrics = client.get("/metrics").text
    assert 'lookalike_http_requests_total{route="/readyz",status="200"}' in metrics


def test_metrics_read_the_queue_depth_from_redis_at_scrape_time(client, gsettings):
    depth = 'lookalike_queue_depth_jobs{queue="vision"}'
    assert f"{depth} 0.0" in client.get("/metrics").text
    for _ in range(2):
        assert client.post("/v1/jobs", files={"image": ("shirt.jpg", jpeg())}).status_code == 202
    assert f"{depth} 2.0" in client.get("/metrics").text
    drop_queued_jobs(redis.Redis.from_url(gsettings.redis_url))
    assert f"{depth} 0.0" in client.get("/metrics").text


def test_metrics_leave_the_queue_depth_out_while_redis_is_down(gsettings):
    dead = GatewaySettings(**{**gsettings.model_dump(), "redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(dead)) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert "# TYPE lookalike_queue_depth_jobs gauge" in response.text
    assert "lookalike_queue_depth_jobs{" not in response.text


def test_not_ready_when_the_broker_is_unreachable(gsettings):
    dead = GatewaySettings(**{**gsettings.model_dump(), "kafka_bootstrap": "127.0.0.1:1"})
    with TestClient(create_app(dead)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["kafka"].startswith("unreachable")


def test_the_gateway_never_imports_torch_or_faiss():
    code = "import sys, gateway.app; print(sorted(m for m in ('torch', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
