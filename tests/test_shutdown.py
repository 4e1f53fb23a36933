"""Graceful shutdown: SIGTERM mid-load loses nothing, on real PostgreSQL, Redis and Kafka.

- A vision worker stopped while jobs run finishes the jobs it is running, leaves the others
  in the queue, and exits 0; a worker started after it finishes every job.
- An indexer stopped mid-ingest finishes its batch, commits exactly what is durable, and exits
  0; the next one goes on from there: every product is stored once, nothing is dead-lettered,
  nothing is processed twice.

No other worker runs during this module (``procfile`` is per module and not used here), so the
workers started below are the only ones taking jobs from queue ``vision``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from kafka import KafkaConsumer, TopicPartition
from starlette.testclient import TestClient

from gateway.app import create_app
from ops.bench_scale import sample_value
from ops.publish import publish, read_catalog
from ops.release import create_topics
from ops.stack import free_port
from schemas.api import JobStatus
from schemas.jobs import job_key
from schemas.settings import GatewaySettings, IndexerSettings
from schemas.tasks import QUEUE_VISION
from tests.conftest import ROOT, SAMPLE, drop_queued_jobs
from tests.workers.test_indexer import read_all
from workers import catalog

BIN = Path(sys.executable).parent


class Process:
    """A worker or indexer process with its log, started with ``LOOKALIKE_*`` from ``env``."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.metrics_port = free_port()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **env, "LOOKALIKE_METRICS_PORT": str(self.metrics_port)})

    def wait_serving(self, timeout_s: float = 120) -> None:
        """Until its /metrics answers (a worker serves them once its model and replicas are loaded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.3)

    def metric(self, name: str) -> float:
        """The value of the /metrics line ``name`` (with its labels, e.g. ``x_bucket{le="4.0"}``); 0 if absent."""
        return sample_value(httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text, name + " ")

    def terminate_and_wait(self, timeout_s: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_worker(stack: dict[str, str], log_path: Path, name: str | None = None) -> Process:
    """A vision worker as the Procfile runs it, its Celery node ``{name}@{host}`` (a random name if None)."""
    name = name or f"shutdown-{uuid.uuid4().hex[:6]}"
    return Process([str(BIN / "celery"), "-A", "workers.tasks", "worker", "-Q", QUEUE_VISION, "-P", "threads",
                    "-c", "2", "-n", f"{name}@%h", "--loglevel", "INFO"], stack, log_path)


def submit_jobs(settings, n: int) -> list[str]:
    """``n`` search jobs of the sample's query photos through the gateway's HTTP API; their ids."""
    photos = sorted((SAMPLE / "queries").glob("*.jpg"))
    job_ids = []
    with TestClient(create_app(GatewaySettings(**settings.model_dump()))) as gateway:
        for i in range(n):
            response = gateway.post("/v1/jobs", files={"image": ("q.jpg", photos[i % len(photos)].read_bytes())})
            assert response.status_code == 202, response.text
            job_ids.append(response.json()["job_id"])
    return job_ids


def statuses(client: redis.Redis, job_ids: list[str]) -> dict[str, str]:
    raw = client.mget([job_key(job_id) for job_id in job_ids])
    return {job_id: JobStatus.model_validate_json(value).status.value for job_id, value in zip(job_ids, raw)}


def test_a_worker_stopped_mid_load_finishes_its_running_jobs_and_loses_none(settings, stack, tmp_path):
    client = redis.Redis.from_url(settings.redis_url)
    drop_queued_jobs(client)  # whatever earlier tests left without a worker
    # Queued before the worker starts: submitted to a running worker, the jobs could all be done by
    # the time the last one was sent, however fast it runs.
    job_ids = submit_jobs(settings, 60)
    first = start_worker(stack, tmp_path / "worker1.log")
    second = None
    try:
        first.wait_serving(300)  # the machine is shared: loading can be slow
        deadline = time.monotonic() + 60
        while True:  # stop it while some jobs run and others wait
            now = statuses(client, job_ids)
            running = {job_id for job_id, state in now.items() if state == "running"}
            if running and "queued" in now.values():
                break
            assert "queued" in now.values() and time.monotonic() < deadline, f"missed the moment: {now}"
            time.sleep(0.01)
        assert first.terminate_and_wait() == 0, first.log()

        after_stop = statuses(client, job_ids)
        assert "running" not in after_stop.values(), first.log()
        assert {after_stop[job_id] for job_id in running} == {"done"}  # finished, not abandoned
        left = [job_id for job_id, state in after_stop.items() if state == "queued"]
        assert left, "the worker took every job before it stopped; nothing shows they stayed queued"

        second = start_worker(stack, tmp_path / "worker2.log")
        deadline = time.monotonic() + 120
        while set(statuses(client, job_ids).values()) != {"done"}:
            assert time.monotonic() < deadline, f"{statuses(client, job_ids)}\n{second.log()}"
            time.sleep(0.2)
        assert client.llen(QUEUE_VISION) == 0
    finally:
        first.stop()
        if second is not None:
            second.terminate_and_wait()


ID_OFFSET = 7_000_000  # product ids of this test's own (recovery tests use 8_000_000+)
MODEL_VERSION = "shutdown-test"


@pytest.fixture
def isettings(settings) -> IndexerSettings:
    name = uuid.uuid4().hex[:8]
    isettings = IndexerSettings(**{**settings.model_dump(), "products_topic": f"{name}.products",
                                   "vectors_topic": f"{name}.vectors", "dlq_topic": f"{name}.dlq",
                                   "group_id": f"indexer-{name}", "model_version": MODEL_VERSION,
                                   "batch_size": 4})
    create_topics(isettings)
    return isettings


def indexer_env(stack: dict[str, str], isettings: IndexerSettings) -> dict[str, str]:
    return {**stack, "LOOKALIKE_PRODUCTS_TOPIC": isettings.products_topic,
            "LOOKALIKE_VECTORS_TOPIC": isettings.vectors_topic, "LOOKALIKE_DLQ_TOPIC": isettings.dlq_topic,
            "LOOKALIKE_GROUP_ID": isettings.group_id, "LOOKALIKE_MODEL_VERSION": MODEL_VERSION,
            "LOOKALIKE_BATCH_SIZE": str(isettings.batch_size)}


def committed(isettings: IndexerSettings) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=isettings.kafka_bootstrap, group_id=isettings.group_id,
                             enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(isettings.products_topic, p)) or 0
                for p in range(isettings.partitions)}
    finally:
        consumer.close()


def test_an_indexer_stopped_mid_ingest_commits_what_is_durable_and_the_next_goes_on(isettings, stack, engine,
                                                                                    tmp_path):
    events, errors = read_catalog(SAMPLE / "products.csv", SAMPLE / "images", version=1)
    assert not errors
    events = [e.model_copy(update={"product_id": e.product_id + ID_OFFSET}) for e in events[:48]]
    ids = [e.product_id for e in events]
    publish(isettings.kafka_bootstrap, isettings.products_topic, events)
    env = indexer_env(stack, isettings)

    first = Process([sys.executable, "-m", "workers.indexer"], env, tmp_path / "indexer1.log")
    second = None
    try:
        deadline = time.monotonic() + 120
        while catalog.count_vectors(engine, MODEL_VERSION, ids) < 8:
            assert first.proc.poll() is None and time.monotonic() < deadline, first.log()
            time.sleep(0.05)
        assert first.terminate_and_wait() == 0, first.log()
        assert "finishing the current batch" in first.log()

        offsets = committed(isettings)
        records = read_all(isettings, isettings.products_topic, isettings.partitions)
        below = {int(r.key) for r in records if r.offset < offsets[r.partition]}
        assert 8 <= len(below) < len(ids), offsets
        assert catalog.count_vectors(engine, MODEL_VERSION, ids) == len(below)  # durable == committed
        assert catalog.count_vectors(engine, MODEL_VERSION, below) == len(below)

        second = Process([sys.executable, "-m", "workers.indexer"], env, tmp_path / "indexer2.log")
        deadline = time.monotonic() + 120
        while catalog.count_vectors(engine, MODEL_VERSION, ids) < len(ids):
            assert second.proc.poll() is None and time.monotonic() < deadline, second.log()
            time.sleep(0.2)
        assert second.terminate_and_wait() == 0, second.log()
        second = None
    finally:
        first.stop()
        if second is not None:
            second.stop()

    assert read_all(isettings, isettings.dlq_topic, 1) == []
    changes = read_all(isettings, isettings.vectors_topic, isettings.partitions)
    assert sorted(int(r.key) for r in changes) == sorted(ids)  # each product once: nothing replayed
