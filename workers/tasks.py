"""The Celery vision worker: takes search jobs from queue ``vision`` and writes results to Redis.

Run it with ``celery -A workers.tasks worker -Q vision -P threads``: one process holds the
model and one replica of every shard, and its threads share them.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
import sqlalchemy as sa
from celery import Celery, signals

from schemas.api import Box, ProductHit, SearchResult
from schemas.jobs import JobStore
from schemas.settings import WorkerSettings
from schemas.tasks import QUEUE_VISION, TASK_SEARCH, SearchTask
from workers import catalog, metrics
from workers.decode import decode
from workers.embed import Embedder
from workers.errors import ImageRejected
from workers.replica import Replica

log = logging.getLogger(__name__)

HIT_FIELDS = ("title", "gender", "master_category", "sub_category", "article_type", "base_colour")

app = Celery("lookalike", set_as_current=False)


@app.on_configure.connect
def _configure(sender: Celery, **_) -> None:
    """Read settings when Celery first needs its configuration, not at import."""
    settings = WorkerSettings()
    sender.conf.update(
        broker_url=settings.redis_url,
        task_default_queue=QUEUE_VISION,
        task_ignore_result=True,  # results live in the job store
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": 300},
        broker_connection_retry_on_startup=True,
        accept_content=["json"],
        worker_hijack_root_logger=False,
    )


class Runtime:
    """What a worker process holds: settings, clients, the model and the replicas."""

    def __init__(self, settings: WorkerSettings) -> None:
        logging.getLogger("kafka").setLevel(logging.WARNING)
        self.settings = settings
        self.engine = sa.create_engine(settings.database_url, pool_pre_ping=True)
        self.store = JobStore(redis.Redis.from_url(settings.redis_url), settings.job_ttl_s)
        self.embedder = Embedder.from_settings(settings)
        self.replica = Replica(settings, self.engine, self.store, self.embedder.dim)

    def start(self) -> None:
        self.embedder.load()
        self.replica.start()

    def search(self, task: SearchTask) -> None:
        """Run one job to ``done`` or ``failed``; never leaves it ``running``."""
        timings: dict[str, float] = {}
        started = self.store.running(task.job_id)
        metrics.STAGE_SECONDS.labels("queue_wait").observe(max(0.0, started.updated_at - started.created_at))
        data = self.store.take_upload(task.job_id)
        if data is None:
            self.store.failed(task.job_id, "upload_expired", "the uploaded image expired before a worker took it; "
                              "submit the job again")
            metrics.JOBS.labels("failed", "upload_expired").inc()
            return
        try:
            with _timed(timings, "decode"):
                pixels = decode(data, self.settings.max_pixels)
        except ImageRejected as exc:
            self.store.failed(task.job_id, exc.code, exc.message, timings)
            metrics.JOBS.labels("rejected", exc.code).inc()
            return
        with _timed(timings, "embed"):
            vector = self.embedder.embed([pixels])
        with _timed(timings, "search"):
            scores, ids = self.replica.shards.search(vector, task.k)
        with _timed(timings, "join"):
            found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
            rows = catalog.fetch_products(self.engine, [i for i, _ in found])
        hits = [ProductHit(product_id=i, score=s, image_url=rows[i].image_url or f"/v1/products/{i}/image",
                           **{f: getattr(rows[i], f) for f in HIT_FIELDS})
                for i, s in found if i in rows]
        height, width = pixels.shape[:2]
        result = SearchResult(model_version=self.embedder.model_version, box=Box(x=0, y=0, w=width, h=height),
                              products=hits)
        done = self.store.done(task.job_id, result, timings)
        metrics.JOBS.labels("done", "").inc()
        metrics.STAGE_SECONDS.labels("total").observe(max(0.0, done.updated_at - done.created_at))


class _timed:
    def __init__(self, timings: dict[str, float], stage: str) -> None:
        self.timings, self.stage = timings, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        elapsed = time.perf_counter() - self.start
        self.timings[self.stage] = elapsed
        metrics.STAGE_SECONDS.labels(self.stage).observe(elapsed)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    """This process's :class:`Runtime`, created and started on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            rt = Runtime(WorkerSettings())
            rt.start()
            _runtime = rt
        return _runtime


@signals.worker_ready.connect
def _warm_up(**_) -> None:
    rt = runtime()
    metrics.serve(rt.settings.metrics_host, rt.settings.metrics_port)


@signals.worker_shutdown.connect
def _shut_down(**_) -> None:
    if _runtime is not None:
        _runtime.replica.stop()


TRANSIENT = (sa.exc.OperationalError, sa.exc.InterfaceError, redis.ConnectionError, redis.TimeoutError)


@app.task(name=TASK_SEARCH, bind=True, max_retries=3)
def search(self, payload: dict) -> None:
    """Celery task ``lookalike.search``: payload is a :class:`schemas.tasks.SearchTask` as a dict."""
    task = SearchTask.model_validate(payload)
    rt = runtime()
    try:
        rt.search(task)
    except TRANSIENT as exc:
        if self.request.retries < self.max_retries:
            log.warning("job %s: transient error, retrying: %s", task.job_id, exc)
            raise self.retry(exc=exc, countdown=2 ** self.request.retries) from None
        _fail(rt, task.job_id, "unavailable", f"a backing service was unavailable after retries: {exc}")
    except Exception as exc:  # the job boundary: whatever went wrong, the job must end, with why
        log.exception("job %s failed", task.job_id)
        _fail(rt, task.job_id, "internal", f"the worker failed: {type(exc).__name__}: {exc}")


def _fail(rt: Runtime, job_id: str, code: str, message: str) -> None:
    metrics.JOBS.labels("failed", code).inc()
    try:
        rt.store.failed(job_id, code, message)
    except redis.RedisError:
        log.exception("could not record the failure of job %s", job_id)
