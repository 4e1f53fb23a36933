"""``lookalike bench scale``: throughput with 1 then 2 worker processes, and 1 then 2 indexers.

On the local stack (or the services configured by ``LOOKALIKE_*`` URLs), after the release step:

- workers: a gateway and N celery workers (each ``-P threads -c 2``, like the Procfile); a burst
  of ``jobs`` search jobs is submitted and timed until every one is done; repeated ``rounds``
  times, the median kept. Each worker's ``lookalike_worker_jobs_total`` shows how many it ran.
- indexers: N indexers in a fresh consumer group on fresh topics; once every one of them owns
  partitions, ``products`` catalog events are published and timed until every product has its
  vector in PostgreSQL. Each indexer's ``lookalike_indexer_events_total{outcome="applied"}``
  shows how many it applied, its lag gauge which partitions it owns.

Nothing is lost when every job ends ``done`` and every product is stored.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = Path(__file__).resolve().parent / "sample"
BIN = Path(sys.executable).parent


@dataclass
class Run:
    """One measured configuration."""

    what: str                   # "workers" or "indexers"
    processes: int
    rates: list[float]          # per round: jobs/s or products/s
    share: list[float]          # per process: jobs run or events applied
    partitions: list[list[int]] = field(default_factory=list)  # indexers: partitions each owned
    lost: int = 0               # jobs not done / products not stored

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


class Proc:
    """A worker, indexer or gateway process with its own metrics port and log."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        from ops.stack import free_port

        self.metrics_port = port or free_port()
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**env, "LOOKALIKE_METRICS_PORT": str(self.metrics_port)})

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def wait(self, check, what: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check():
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up; log {self.log_path}:\n"
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_gateway(env: dict[str, str], log_dir: Path) -> tuple[Proc, str]:
    """A gateway with no queue bound (benches measure the workers, not the admission control),
    and its URL, once it answers /readyz."""
    from ops.stack import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = Proc([str(BIN / "uvicorn"), "--factory", "gateway.app:create_app", "--port", str(port)],
                   {**env, "LOOKALIKE_MAX_QUEUE_DEPTH": "0"}, log_dir / "web.log")
    try:
        gateway.wait(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, "the gateway")
    except BaseException:
        gateway.stop()
        raise
    return gateway, url


def worker_proc(env: dict[str, str], log_path: Path, name: str) -> Proc:
    """A vision worker as the Procfile runs it (``-P threads -c 2``), just started."""
    return Proc([str(BIN / "celery"), "-A", "workers.tasks", "worker", "-Q", "vision", "-P", "threads",
                 "-c", "2", "-n", f"{name}@%h", "--loglevel", "WARNING"], env, log_path)


def sample_value(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` whose labels contain ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def bench_workers(env: dict[str, str], log_dir: Path, counts: tuple[int, ...], jobs: int, rounds: int,
                  say=print) -> list[Run]:
    import redis

    from schemas.api import JobStatus
    from schemas.jobs import job_key

    client = redis.Redis.from_url(env["LOOKALIKE_REDIS_URL"])
    photos = [p.read_bytes() for p in sorted((SAMPLE / "queries").glob("*.jpg"))]
    gateway, url = start_gateway(env, log_dir)
    runs = []
    try:
        for n in counts:
            workers = [worker_proc(env, log_dir / f"worker-{n}-{i}.log", f"bench{i}-{uuid.uuid4().hex[:4]}")
                       for i in range(n)]  # all loading at once, then waited for
            try:
                for worker in workers:
                    worker.wait(lambda w=worker: w.metrics() is not None, "a worker")
                say(f"{n} worker(s) serving; {rounds} rounds of {jobs} jobs")
                rates, lost = [], 0
                for round_ in range(rounds + 1):  # round 0 warms up and is not counted
                    with ThreadPoolExecutor(8) as pool, httpx.Client(timeout=30) as http:
                        started = time.monotonic()
                        ids = list(pool.map(lambda i: http.post(f"{url}/v1/jobs", files={
                            "image": ("q.jpg", photos[i % len(photos)])}).json()["job_id"], range(jobs)))
                    while True:
                        states = [JobStatus.model_validate_json(raw).status.value
                                  for raw in client.mget([job_key(j) for j in ids])]
                        if all(s in ("done", "failed") for s in states):
                            break
                        if time.monotonic() - started > 600:
                            break
                        time.sleep(0.05)
                    took = time.monotonic() - started
                    if round_:
                        rates.append(jobs / took)
                        lost += sum(s != "done" for s in states)
                share = [sample_value(w.metrics(), "lookalike_worker_jobs_total", 'outcome="done"') for w in workers]
                runs.append(Run("workers", n, rates, share, lost=lost))
                say(f"  {statistics.median(rates):.1f} jobs/s (rounds: {', '.join(f'{r:.1f}' for r in rates)}), "
                    f"jobs per worker {[int(s) for s in share]}, not done {lost}")
            finally:
                for worker in workers:
                    worker.stop()
    finally:
        gateway.stop()
    return runs


def bench_indexers(env: dict[str, str], log_dir: Path, counts: tuple[int, ...], products: int, rounds: int,
                   say=print) -> list[Run]:
    import sqlalchemy as sa

    from ops.publish import publish, read_catalog
    from schemas.settings import IndexerSettings
    from workers import catalog
    from workers.topics import create_topics

    events, _ = read_catalog(SAMPLE / "products.csv", SAMPLE / "images")
    events = events[:products]
    engine = sa.create_engine(env["LOOKALIKE_DATABASE_URL"])
    runs = []
    try:
        for n in counts:
            rates, lost, share, owned = [], 0, [0.0] * n, [[] for _ in range(n)]
            for round_ in range(rounds):
                name = uuid.uuid4().hex[:8]
                names = {"LOOKALIKE_PRODUCTS_TOPIC": f"bench-{name}.products",
                         "LOOKALIKE_VECTORS_TOPIC": f"bench-{name}.vectors", "LOOKALIKE_DLQ_TOPIC": f"bench-{name}.dlq",
                         "LOOKALIKE_GROUP_ID": f"bench-{name}", "LOOKALIKE_MODEL_VERSION": f"bench-{name}"}
                settings = IndexerSettings(database_url=env["LOOKALIKE_DATABASE_URL"],
                                           kafka_bootstrap=env["LOOKALIKE_KAFKA_BOOTSTRAP"],
                                           **{k.removeprefix("LOOKALIKE_").lower(): v for k, v in names.items()})
                create_topics(settings)
                indexers = []
                try:
                    # One at a time, each once it owns partitions: two joining the group at once on
                    # Tansu were seen to both end with no partitions for over a minute.
                    for i in range(n):
                        indexer = Proc([sys.executable, "-m", "workers.indexer"], {**env, **names},
                                       log_dir / f"indexer-{n}-{round_}-{i}.log")
                        indexers.append(indexer)
                        indexer.wait(lambda x=indexer: _owned(x.log_path), "an indexer owning partitions")
                    # every indexer owns partitions: the group has settled (owned shards are logged)
                    deadline = time.monotonic() + 90
                    while True:
                        held = [_owned(x.log_path) for x in indexers]
                        if all(held) and sorted(sum(held, [])) == list(range(settings.partitions)):
                            break
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"the group did not settle: partitions {held}")
                        time.sleep(0.3)
                    ids = [e.product_id for e in events]
                    version = time.time_ns() // 1_000_000  # newer than any stored: every event is embedded
                    fresh = [e.model_copy(update={"version": version}) for e in events]
                    started = time.monotonic()
                    publish(settings.kafka_bootstrap, settings.products_topic, fresh)
                    while catalog.count_vectors(engine, settings.model_version, ids) < len(ids) and \
                            time.monotonic() - started < 600:
                        time.sleep(0.1)
                    rates.append(len(ids) / (time.monotonic() - started))
                    lost += len(ids) - catalog.count_vectors(engine, settings.model_version, ids)
                    for i, indexer in enumerate(indexers):
                        share[i] += sample_value(indexer.metrics(), "lookalike_indexer_events_total",
                                                 'outcome="applied"')
                        owned[i] = _owned(indexer.log_path)
                finally:
                    for indexer in indexers:
                        indexer.stop()
            runs.append(Run("indexers", n, rates, share, owned, lost))
            say(f"{n} indexer(s): {statistics.median(rates):.1f} products/s (rounds: "
                f"{', '.join(f'{r:.1f}' for r in rates)}), applied per indexer {[int(s) for s in share]}, "
                f"partitions {owned}, not stored {lost}")
    finally:
        engine.dispose()
    return runs


OWNERSHIP = re.compile(r"(own|gave up) shard (\d+)")


def _owned(log_path: Path) -> list[int]:
    """Partitions an indexer owns now, replaying the "own shard" and "gave up shard" lines of its log."""
    owned: set[int] = set()
    for verb, partition in OWNERSHIP.findall(log_path.read_text(errors="replace")):
        (owned.add if verb == "own" else owned.discard)(int(partition))
    return sorted(owned)


def machine() -> str:
    import platform

    cpu = "?"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}"
