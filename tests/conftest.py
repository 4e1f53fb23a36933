"""Shared fixtures: real PostgreSQL, Redis and a Kafka-protocol broker.

PostgreSQL and Redis are the machine's (``LOOKALIKE_TEST_DATABASE_URL``, default the
``test`` database on 127.0.0.1:5432; ``LOOKALIKE_TEST_REDIS_URL``, default db 15 on
127.0.0.1:6379) when they answer, else embedded ones from ``ops.stack``; the broker is
always an embedded Tansu, fresh per test session. The database schema is dropped and
migrated at the start of the session. ``procfile`` runs the Procfile's processes on them,
once per test module, for the tests of the whole system.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import redis
import sqlalchemy as sa

from ops.release import release
from ops.stack import LocalStack
from schemas.jobs import QUEUED_KEY, QUEUED_MESSAGES_KEY
from schemas.settings import Settings
from schemas.tasks import QUEUE_VISION

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "ops" / "sample"
TEST_DATABASE_URL = os.environ.get("LOOKALIKE_TEST_DATABASE_URL",
                                   "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
API_KEY = "e2e-" + "3c" * 16  # the catalog-write key the `procfile` gateway accepts
TEST_REDIS_URL = os.environ.get("LOOKALIKE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _answers(check) -> bool:
    with contextlib.suppress(Exception):
        check()
        return True
    return False


def _pg_check() -> None:
    engine = sa.create_engine(TEST_DATABASE_URL, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> dict[str, str]:
    """``LOOKALIKE_*`` URLs of real services for this test session."""
    env = {}
    if _answers(_pg_check):
        env["LOOKALIKE_DATABASE_URL"] = TEST_DATABASE_URL
    if _answers(lambda: redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=2).ping()):
        env["LOOKALIKE_REDIS_URL"] = TEST_REDIS_URL
    with LocalStack(tmp_path_factory.mktemp("stack"), env=env) as local:
        yield local.environ()


@pytest.fixture(scope="session")
def settings(stack) -> Settings:
    """Settings pointing at the test services, after a clean schema and the release step."""
    settings = Settings(database_url=stack["LOOKALIKE_DATABASE_URL"], redis_url=stack["LOOKALIKE_REDIS_URL"],
                        kafka_bootstrap=stack["LOOKALIKE_KAFKA_BOOTSTRAP"])
    engine = sa.create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS product_vectors, products, alembic_version CASCADE"))
    engine.dispose()
    redis.Redis.from_url(settings.redis_url).flushdb()
    release(settings)
    return settings


@pytest.fixture(scope="session")
def engine(settings) -> sa.Engine:
    engine = sa.create_engine(settings.database_url)
    yield engine
    engine.dispose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests run only when asked for (``-m slow``); ``gpu`` tests only where CUDA is."""
    asked = config.getoption("markexpr") or ""
    cuda = None
    for item in items:
        if "slow" in item.keywords and "slow" not in asked:
            item.add_marker(pytest.mark.skip(reason="needs minutes of CPU: run with -m slow (make test-slow)"))
        if "gpu" in item.keywords:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def embedder():
    from workers.embed import Embedder

    model = Embedder("test-model", device="cpu")
    model.load()
    return model


@dataclass
class System:
    """The Procfile's long-running processes under honcho: where to reach each of them."""

    url: str                    # the gateway
    metrics: dict[str, str]     # process name -> its /metrics URL
    log_path: Path              # honcho's output, every process prefixed by its name


def free_base_port(processes: int) -> int:
    """A base port for ``honcho start -p`` such that base + 100 * i is free for each process i.

    honcho gives the i-th process named on its command line ``PORT = base + 100 * i``; picking
    a base at random keeps test sessions that run side by side off each other's ports.
    """
    for _ in range(100):
        base = random.randrange(20000, 30000)
        try:
            for i in range(processes):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", base + 100 * i))
        except OSError:
            continue
        return base
    raise RuntimeError("no free run of ports for honcho")


def _answers_http(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def procfile(settings, stack, tmp_path_factory) -> System:
    """honcho running `web`, `worker` and `indexer` from the Procfile, every one answering.

    One per test module, stopped at its end, so that a module can run processes of its own
    (say, workers to stop mid-job) without others taking their work.

    Ready means: the gateway's /readyz is 200 and the worker's and the indexer's /metrics answer
    (the worker serves them once its model and replicas are loaded).
    """
    from ops.stack import free_port

    processes = ["web", "worker", "indexer"]
    port, base = free_port(), free_base_port(len(processes))
    log_path = tmp_path_factory.mktemp("procs") / "honcho.log"
    env = {**os.environ, **stack, "LOOKALIKE_PORT": str(port), "LOOKALIKE_WORKER_THREADS": "2",
           "LOOKALIKE_API_KEY_SHA256": json.dumps([hashlib.sha256(API_KEY.encode()).hexdigest()]),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(log_path, "wb") as log:
        honcho = subprocess.Popen([str(Path(sys.executable).parent / "honcho"), "start", "-f", str(ROOT / "Procfile"),
                                   "-d", str(ROOT), "-p", str(base), *processes],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    system = System(url=f"http://127.0.0.1:{port}", log_path=log_path,
                    metrics={name: f"http://127.0.0.1:{base + 100 * i}/metrics"
                             for i, name in enumerate(processes) if name != "web"})
    system.metrics["web"] = f"{system.url}/metrics"
    try:
        deadline = time.monotonic() + 180
        checks = [f"{system.url}/readyz", system.metrics["worker"], system.metrics["indexer"]]
        while checks:
            if _answers_http(checks[0]):
                checks.pop(0)
                continue
            assert honcho.poll() is None and time.monotonic() < deadline, \
                f"{checks[0]} did not answer:\n{log_path.read_text()[-5000:]}"
            time.sleep(0.5)
        yield system
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        honcho.wait(timeout=60)
        if honcho.returncode not in (0, -signal.SIGTERM, 143):
            print(log_path.read_text()[-5000:])


def declared(module: ModuleType) -> dict[str, tuple[str, set[str]]]:
    """Metric families a metrics module declares: family name -> (type, label names).

    Label names come from ``_labelnames`` of prometheus_client's metrics and ``LABELS`` of the
    modules' own collectors.
    """
    families = {}
    for obj in vars(module).values():
        if callable(getattr(obj, "describe", None)) and not isinstance(obj, (type, ModuleType)):
            labels = set(getattr(obj, "_labelnames", None) or getattr(obj, "LABELS", ()))
            for family in obj.describe():
                families[family.name] = (family.type, labels)
    return families


def drop_queued_jobs(client: redis.Redis) -> None:
    """Forget every job message: the queue, kombu's unacked ones, and the copies the job store keeps
    for the lost-message sweep. Jobs a test left without a worker must not be run, or sent again by
    the sweep, in a later test's worker."""
    client.delete(QUEUE_VISION, "unacked", "unacked_index", QUEUED_KEY, QUEUED_MESSAGES_KEY)


def take_message(client: redis.Redis, task_id: str) -> dict:
    """Pop the message of ``task_id`` off queue ``vision``, as a worker's BRPOP would."""
    for raw in client.lrange(QUEUE_VISION, 0, -1):
        if json.loads(raw)["headers"]["id"] == task_id:
            client.lrem(QUEUE_VISION, 1, raw)
            return json.loads(raw)
    raise AssertionError(f"no message of {task_id} in queue {QUEUE_VISION}")


@contextlib.contextmanager
def serve_photos(photo: Callable[[str], bytes | None]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1: ``GET /<name>`` answers ``photo(name)`` (404 when None).
    Yields its base URL."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = photo(self.path.strip("/")) or b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
