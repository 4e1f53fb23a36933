"""Overload and outages, against real services: Redis or PostgreSQL stopped for 10 s under load,
and a burst of ten times what the worker can take.

PostgreSQL and Redis here are private ones of this module (``ops.stack.LocalStack``), so that
stopping them touches nothing else; the broker is the session's. The gateway, the worker and
the indexer run as real processes, as the Procfile runs them.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from ops.publish import publish, read_catalog
from ops.release import release
from ops.stack import LocalStack, free_port
from schemas.jobs import JobStore, new_job_id
from schemas.settings import IndexerSettings, Settings
from schemas.tasks import QUEUE_VISION, TASK_SEARCH, SearchTask
from tests.conftest import SAMPLE, drop_queued_jobs
from tests.test_shutdown import BIN, Process, start_worker, statuses
from tests.workers.test_indexer import read_all
from workers import catalog
from workers.topics import create_topics

OUTAGE_S = 10
PHOTO = sorted((SAMPLE / "queries").glob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def private(stack):
    """A LocalStack with its own PostgreSQL and Redis (released), and the session's broker."""
    state_dir = Path(tempfile.mkdtemp(prefix="lookalike-outage-"))
    state_dir.chmod(0o755)  # PostgreSQL runs as `nobody` when we are root; pytest's tmp_path is 0700
    try:
        with LocalStack(state_dir, services=("postgres", "redis"),
                        env={"LOOKALIKE_KAFKA_BOOTSTRAP": stack["LOOKALIKE_KAFKA_BOOTSTRAP"]}) as local:
            env = local.environ()
            release(Settings(database_url=env["LOOKALIKE_DATABASE_URL"], redis_url=env["LOOKALIKE_REDIS_URL"],
                             kafka_bootstrap=env["LOOKALIKE_KAFKA_BOOTSTRAP"]))
            yield local
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def env(private) -> dict[str, str]:
    return {**private.environ(), "LOOKALIKE_VISIBILITY_TIMEOUT_S": "10", "LOOKALIKE_MAX_QUEUE_DEPTH": "0"}


class Gateway(Process):
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([str(BIN / "uvicorn"), "--factory", "gateway.app:create_app", "--port", str(self.port)],
                         env, log_path)

    def wait_serving(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not _status(f"{self.url}/readyz") == 200:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.3)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def submit(client: httpx.Client, url: str) -> tuple[float, int, float, str | None, str | None]:
    """(sent at, status or 0 for no answer, seconds taken, job id, Retry-After) of one POST /v1/jobs."""
    sent = time.time()
    try:
        response = client.post(f"{url}/v1/jobs", files={"image": ("q.jpg", PHOTO)}, timeout=30)
    except httpx.HTTPError:
        return sent, 0, time.time() - sent, None, None
    job_id = response.json()["job_id"] if response.status_code == 202 else None
    return sent, response.status_code, time.time() - sent, job_id, response.headers.get("retry-after")


class Load(threading.Thread):
    """Submits a job every ``every_s`` until stopped, recording every answer."""

    def __init__(self, url: str, every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.url, self.every_s, self.stopped, self.results = url, every_s, threading.Event(), []

    def run(self) -> None:
        with httpx.Client() as client:
            while not self.stopped.is_set():
                self.results.append(submit(client, self.url))
                self.stopped.wait(self.every_s)

    def stop(self) -> list:
        self.stopped.set()
        self.join()
        return self.results


def wait_ended(client: redis.Redis, job_ids: list[str], timeout_s: float) -> dict[str, str]:
    """Until every job is done or failed; their final states."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = statuses(client, job_ids)
        if set(now.values()) <= {"done", "failed"}:
            return now
        assert time.monotonic() < deadline, {s: list(now.values()).count(s) for s in set(now.values())}
        time.sleep(0.3)


def test_redis_stopped_for_10_s_gives_503_then_recovers_without_restarts(private, env, tmp_path):
    gateway, worker = Gateway(env, tmp_path / "web.log"), start_worker(env, tmp_path / "worker.log")
    try:
        gateway.wait_serving()
        worker.wait_serving(300)  # the machine is shared: loading can be slow
        load = Load(gateway.url)
        load.start()
        time.sleep(3)
        private.stop_service("redis")
        stopped_at = time.time()
        while _status(f"{gateway.url}/readyz") != 503:
            assert time.time() < stopped_at + 5, "readyz stayed ready with Redis stopped"
            time.sleep(0.1)
        not_ready_after = time.time() - stopped_at
        time.sleep(max(0.0, stopped_at + OUTAGE_S - time.time()))
        restarting_at = time.time()
        private.start_service("redis")
        started_at = time.time()
        while _status(f"{gateway.url}/readyz") != 200 or \
                not any(r[0] > started_at and r[1] == 202 for r in load.results):
            assert time.time() < started_at + 30, f"no recovery:\n{gateway.log()}"
            time.sleep(0.1)
        recovered_after = time.time() - started_at
        time.sleep(2)
        results = load.stop()

        during = [r for r in results if stopped_at + 0.5 < r[0] and r[0] + r[2] < restarting_at]
        print(f"\nRedis down {restarting_at - stopped_at:.1f} s: readyz 503 after {not_ready_after:.1f} s, "
              f"{len(during)} submits during it answered {sorted({r[1] for r in during})} in at most "
              f"{max(r[2] for r in during):.2f} s; ready and accepting {recovered_after:.1f} s after it came back")
        assert during and {r[1] for r in during} == {503}, during
        assert max(r[2] for r in during) < 10  # answered, not hanging
        assert {r[1] for r in results} <= {202, 503}, [r for r in results if r[1] not in (202, 503)]
        assert worker.proc.poll() is None and gateway.proc.poll() is None  # no restarts

        accepted = [r[3] for r in results if r[1] == 202]
        ended = wait_ended(redis.Redis.from_url(env["LOOKALIKE_REDIS_URL"]), accepted, 90)
        print(f"{len(accepted)} accepted jobs ended: {sorted(ended.values()).count('done')} done, "
              f"{sorted(ended.values()).count('failed')} failed (with a reason)")
    finally:
        gateway.stop()
        worker.stop()


def test_a_burst_of_ten_times_capacity_gets_503_past_the_bound_and_every_accepted_job_finishes(env, tmp_path):
    env = {**env, "LOOKALIKE_MAX_QUEUE_DEPTH": "10", "LOOKALIKE_QUEUE_RETRY_AFTER_S": "2"}
    client = redis.Redis.from_url(env["LOOKALIKE_REDIS_URL"])
    drop_queued_jobs(client)
    gateway, worker = Gateway(env, tmp_path / "web.log"), start_worker(env, tmp_path / "worker.log")
    try:
        gateway.wait_serving()
        worker.wait_serving(300)  # the machine is shared: loading can be slow
        with httpx.Client() as http:  # warm-up and the worker's rate
            started = time.time()
            warm = [submit(http, gateway.url)[3] for _ in range(10)]
            wait_ended(client, warm, 60)
            rate = 10 / (time.time() - started)
        rss_before = gateway.rss_mib()
        burst = max(100, int(rate * 10))
        with ThreadPoolExecutor(8) as pool, httpx.Client() as http:
            started = time.time()
            results = list(pool.map(lambda _: submit(http, gateway.url), range(burst)))
            took = time.time() - started
        rss_after = gateway.rss_mib()
        codes = [r[1] for r in results]
        accepted = [r[3] for r in results if r[1] == 202]
        print(f"\nburst of {burst} jobs in {took:.1f} s (the worker takes {rate:.1f}/s): {codes.count(202)} accepted, "
              f"{codes.count(503)} got 503; gateway RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
        assert set(codes) == {202, 503}, set(codes)
        assert {r[4] for r in results if r[1] == 503} == {"2"}
        assert rss_after - rss_before < 50
        ended = wait_ended(client, accepted, 120)
        assert set(ended.values()) == {"done"}
    finally:
        gateway.stop()
        worker.stop()


def test_postgres_stopped_for_10_s_pauses_the_indexer_and_nothing_is_skipped(private, env, tmp_path):
    """The indexer retries its batch until PostgreSQL is back; jobs that need it ("more like this",
    which reads the product's vector) end done after a retry or failed with code ``unavailable``."""
    name = uuid.uuid4().hex[:8]
    env = {**env, "LOOKALIKE_PRODUCTS_TOPIC": f"{name}.products", "LOOKALIKE_VECTORS_TOPIC": f"{name}.vectors",
           "LOOKALIKE_DLQ_TOPIC": f"{name}.dlq", "LOOKALIKE_GROUP_ID": f"indexer-{name}",
           "LOOKALIKE_MODEL_VERSION": f"outage-{name}", "LOOKALIKE_BATCH_SIZE": "4"}
    isettings = IndexerSettings(database_url=env["LOOKALIKE_DATABASE_URL"], redis_url=env["LOOKALIKE_REDIS_URL"],
                                kafka_bootstrap=env["LOOKALIKE_KAFKA_BOOTSTRAP"], products_topic=f"{name}.products",
                                vectors_topic=f"{name}.vectors", dlq_topic=f"{name}.dlq",
                                model_version=f"outage-{name}")
    create_topics(isettings)
    events, errors = read_catalog(SAMPLE / "products.csv", SAMPLE / "images", version=1)
    assert not errors
    events = [e.model_copy(update={"product_id": e.product_id + 6_000_000}) for e in events[:80]]
    ids = [e.product_id for e in events]
    engine = sa.create_engine(env["LOOKALIKE_DATABASE_URL"], pool_pre_ping=True)
    client = redis.Redis.from_url(env["LOOKALIKE_REDIS_URL"])
    store = JobStore(client, 3600)
    celery = Celery("outage-test", broker=env["LOOKALIKE_REDIS_URL"], set_as_current=False)
    indexer = Process([sys.executable, "-m", "workers.indexer"], env, tmp_path / "indexer.log")
    worker = start_worker(env, tmp_path / "worker.log")

    target: list[int] = []

    def more_like_this() -> str:
        task = SearchTask(job_id=new_job_id(), k=3, product_id=target[0])
        store.create(task.job_id, None)
        celery.send_task(TASK_SEARCH, args=[task.model_dump(mode="json")], queue=QUEUE_VISION)
        return task.job_id

    try:
        worker.wait_serving(300)
        publish(isettings.kafka_bootstrap, isettings.products_topic, events)
        deadline = time.monotonic() + 300
        while catalog.count_vectors(engine, isettings.model_version, ids) < 8:
            assert indexer.proc.poll() is None and time.monotonic() < deadline, indexer.log()
            time.sleep(0.05)
        # The jobs ask about a product indexed already: one that ended `unknown_product` would be
        # about ingest order, not about the outage.
        target.append(next(i for i in ids if catalog.count_vectors(engine, isettings.model_version, [i])))
        private.stop_service("postgres")
        stopped_at = time.time()
        during = [more_like_this()]
        time.sleep(OUTAGE_S / 2)
        during.append(more_like_this())
        time.sleep(max(0.0, stopped_at + OUTAGE_S - time.time()))
        private.start_service("postgres")
        started_at = time.time()
        engine.dispose()
        deadline = time.monotonic() + 300
        while catalog.count_vectors(engine, isettings.model_version, ids) < len(ids):
            assert indexer.proc.poll() is None and time.monotonic() < deadline, indexer.log()
            time.sleep(0.2)
        indexed_after = time.time() - started_at
        after = [more_like_this()]
        ended = {job_id: store.get(job_id) for job_id in wait_ended(client, during + after, 120)}
        print(f"\nPostgreSQL down {started_at - stopped_at:.1f} s: all {len(ids)} products indexed "
              f"{indexed_after:.1f} s after it came back, no restart; jobs during it: "
              f"{[(s.status.value, s.error and s.error.code) for s in map(ended.get, during)]}")
        assert "transient error" in indexer.log()
        for job_id in during:
            assert ended[job_id].status.value == "done" or ended[job_id].error.code == "unavailable", ended[job_id]
        assert ended[after[0]].status.value == "done", ended[after[0]]
        assert indexer.proc.poll() is None and worker.proc.poll() is None
    finally:
        indexer.stop()
        worker.stop()
        engine.dispose()
    assert read_all(isettings, isettings.dlq_topic, 1) == []
    assert {int(r.key) for r in read_all(isettings, isettings.vectors_topic, isettings.partitions)} == set(ids)
