"""Micro-batching in a real Celery worker (celery-batches on the Redis broker): jobs submitted
together through the HTTP API run in shared micro-batches, each gets its own result, and a bad
upload fails only its own job."""

from __future__ import annotations

import time

import httpx
import redis
from starlette.testclient import TestClient

from gateway.app import create_app
from schemas.settings import GatewaySettings
from schemas.tasks import QUEUE_VISION
from tests.conftest import SAMPLE
from tests.test_shutdown import start_worker, statuses


def scraped(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_jobs_submitted_together_share_micro_batches_and_a_bad_one_fails_alone(settings, stack, tmp_path):
    client = redis.Redis.from_url(settings.redis_url)
    client.delete(QUEUE_VISION)  # whatever earlier tests left without a worker
    # a long wait, so the batches are cut by size, not by the clock
    worker = start_worker({**stack, "LOOKALIKE_JOB_BATCH_SIZE": "6", "LOOKALIKE_JOB_BATCH_WAIT_MS": "2000"},
                          tmp_path / "worker.log")
    try:
        worker.wait_serving(300)
        photos = sorted((SAMPLE / "queries").glob("*.jpg"))
        uploads = [photos[i % len(photos)].read_bytes() for i in range(12)]
        uploads[4] = uploads[4][:2000]  # a JPEG cut short: its header passes the gateway, decoding fails
        with TestClient(create_app(GatewaySettings(**settings.model_dump()))) as gateway:
            job_ids = []
            for data in uploads:
                response = gateway.post("/v1/jobs", files={"image": ("q.jpg", data)})
                assert response.status_code == 202, response.text
                job_ids.append(response.json()["job_id"])
            deadline = time.monotonic() + 120
            while set(statuses(client, job_ids).values()) - {"done", "failed"}:
                assert time.monotonic() < deadline, f"{statuses(client, job_ids)}\n{worker.log()}"
                time.sleep(0.1)
            results = [gateway.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids]
        assert [r["status"] for r in results] == ["done"] * 4 + ["failed"] + ["done"] * 7
        assert results[4]["error"]["code"] == "truncated", results[4]
        batches = scraped(worker.metrics_port, "lookalike_worker_batch_jobs_count")
        assert scraped(worker.metrics_port, "lookalike_worker_batch_jobs_sum") == 12
        assert batches == 2, f"12 jobs in {batches} micro-batches, expected 2 of 6\n{worker.log()}"
    finally:
        worker.terminate_and_wait()
