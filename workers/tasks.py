"""The Celery vision worker: takes search jobs from queue ``vision`` and writes results to Redis.

Run it with ``celery -A workers.tasks worker -Q vision -P threads``: one process holds the
model and one replica of every shard, and its threads share them.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import redis
import sqlalchemy as sa
from celery import Celery, signals

from schemas.api import Box, Category, CategoryScore, EmbeddingResult, ProductHit, SearchResult
from schemas.jobs import JobStore
from schemas.settings import WorkerSettings
from schemas.tasks import QUEUE_VISION, TASK_EMBED, TASK_SEARCH, EmbedTask, SearchTask, transport_options
from workers import catalog, metrics
from workers.classify import DEFAULT_DIR, CategoryHeads, auto_category
from workers.decode import decode
from workers.embed import Embedder
from workers.errors import CropRejected, InvalidInput, UploadExpired
from workers.fetch import Fetcher
from workers.replica import Replica
from workers.segment import Segmenter

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
        broker_transport_options=transport_options(settings.visibility_timeout_s),
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
        self.segmenter = Segmenter(self.embedder.device) if settings.segment else None
        self.heads = CategoryHeads(settings.heads_dir or DEFAULT_DIR)
        self.replica = Replica(settings, self.engine, self.store, self.embedder.dim)
        self.fetcher = Fetcher(settings)

    def start(self) -> None:
        self.embedder.load()
        self.heads.load()
        self.replica.start()

    def search(self, task: SearchTask) -> None:
        """Run one job to ``done`` or ``failed``; never leaves it ``running``."""
        timings: dict[str, float] = {}
        started = self.store.running(task.job_id)
        metrics.STAGE_SECONDS.labels("queue_wait").observe(max(0.0, started.updated_at - started.created_at))
        queried = self.query_or_reject(task, timings)
        if queried is None:
            return
        vector, box = queried
        with _timed(timings, "classify"):
            predicted = self.heads.predict(vector)[0]
        category = task.category
        if category == "auto":
            chosen = auto_category(predicted, self.settings.auto_category_min_prob)
            category = Category(level=chosen[0], value=chosen[1]) if chosen else None
        with _timed(timings, "filter"):
            allowed = catalog.matching_ids(self.engine, task.filters, category)
            excluded = np.array([*task.exclude_ids, *([task.product_id] if task.product_id else [])], dtype=np.int64)
        with _timed(timings, "search"):
            scores, ids = self.replica.shards.search(vector, task.k, allowed=allowed, excluded=excluded)
        with _timed(timings, "join"):
            found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
            rows = catalog.fetch_products(self.engine, [i for i, _ in found])
        hits = [ProductHit(product_id=i, score=s, image_url=rows[i].image_url or f"/v1/products/{i}/image",
                           **{f: getattr(rows[i], f) for f in HIT_FIELDS})
                for i, s in found if i in rows]
        categories = {level: [CategoryScore(label=label, prob=prob) for label, prob in top]
                      for level, top in predicted.items()}
        result = SearchResult(model_version=self.embedder.model_version, box=box, products=hits,
                              categories=categories, category=category)
        done = self.store.done(task.job_id, result, timings)
        metrics.JOBS.labels("done", "").inc()
        metrics.STAGE_SECONDS.labels("total").observe(max(0.0, done.updated_at - done.created_at))

    def embed(self, task: EmbedTask) -> None:
        """Run one embedding job to ``done`` (with the vector) or ``failed``."""
        timings: dict[str, float] = {}
        self.store.running(task.job_id)
        queried = self.query_or_reject(task, timings)
        if queried is None:
            return
        vector, box = queried
        result = EmbeddingResult(model_version=self.embedder.model_version, box=box, dim=vector.shape[1],
                                 vector=vector[0].tolist())
        self.store.done(task.job_id, result, timings)
        metrics.JOBS.labels("done", "").inc()

    def query_or_reject(self, task: SearchTask | EmbedTask, timings: dict[str, float]
                        ) -> tuple[np.ndarray, Box | None] | None:
        """:meth:`query`, or None after ending the job ``failed`` with the reason of its invalid input."""
        try:
            return self.query(task, timings)
        except InvalidInput as exc:
            self.store.failed(task.job_id, exc.code, exc.message, timings)
            metrics.JOBS.labels("failed" if isinstance(exc, UploadExpired) else "rejected", exc.code).inc()
            return None

    def query(self, task: SearchTask | EmbedTask, timings: dict[str, float]) -> tuple[np.ndarray, Box | None]:
        """The query vector, float32 (1, D) L2-normalised, and the box of the image it came from.

        Raises:
            UploadExpired: the upload left Redis before a worker took it.
            InvalidInput: the image was refused (``ImageRejected`` and its subclasses: fetch, decode,
                crop), or the product has no vector (``unknown_product``).
        """
        if getattr(task, "product_id", None) is not None:
            vector = catalog.fetch_vector(self.engine, task.product_id, self.embedder.model_version)
            if vector is None:
                raise InvalidInput(f"product {task.product_id} is not in the catalog or has no vector of model "
                                   f"{self.embedder.model_version} yet; try again once it is indexed",
                                   "unknown_product")
            return vector[None, :], None
        if task.image_url is not None:
            with _timed(timings, "fetch"):
                data = self.fetcher.fetch(task.image_url)
        else:
            data = self.store.take_upload(task.job_id)
            if data is None:
                raise UploadExpired("the uploaded image expired before a worker took it; submit the job again")
        with _timed(timings, "decode"):
            pixels = decode(data, self.settings.max_pixels)
        with _timed(timings, "segment"):  # a caller's crop box wins over segmentation
            if task.crop is None and self.segmenter is not None:
                pixels, box = self.segmenter.crop_all([pixels])[0]
            else:
                pixels, box = crop(pixels, task.crop)
        with _timed(timings, "embed"):
            return self.embedder.embed([pixels]), box


def crop(pixels: np.ndarray, box: Box | None) -> tuple[np.ndarray, Box]:
    """The part of ``pixels`` inside ``box`` (the whole image when None).

    Args:
        pixels: uint8 (H, W, 3) RGB, as decoded.
        box: In pixels of ``pixels``.

    Returns:
        uint8 (h, w, 3) RGB, and the box used.

    Raises:
        CropRejected: the box does not lie inside the image.
    """
    height, width = pixels.shape[:2]
    if box is None:
        return pixels, Box(x=0, y=0, w=width, h=height)
    if box.x + box.w > width or box.y + box.h > height:
        raise CropRejected(f"the crop box x={box.x} y={box.y} w={box.w} h={box.h} reaches past the image, which is "
                           f"{width}x{height} px (after EXIF rotation); keep x+w <= {width} and y+h <= {height}")
    return pixels[box.y:box.y + box.h, box.x:box.x + box.w], box


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
        _runtime.fetcher.close()


TRANSIENT = (sa.exc.OperationalError, sa.exc.InterfaceError, redis.ConnectionError, redis.TimeoutError)


@app.task(name=TASK_SEARCH, bind=True, max_retries=3)
def search(self, payload: dict) -> None:
    """Celery task ``lookalike.search``: payload is a :class:`schemas.tasks.SearchTask` as a dict."""
    task = SearchTask.model_validate(payload)
    _run(self, task.job_id, lambda rt: rt.search(task))


@app.task(name=TASK_EMBED, bind=True, max_retries=3)
def embed(self, payload: dict) -> None:
    """Celery task ``lookalike.embed``: payload is a :class:`schemas.tasks.EmbedTask` as a dict."""
    task = EmbedTask.model_validate(payload)
    _run(self, task.job_id, lambda rt: rt.embed(task))


def _run(celery_task, job_id: str, job) -> None:
    """The job boundary: retry transient failures, and whatever else goes wrong, end the job with why."""
    rt = runtime()
    try:
        job(rt)
    except TRANSIENT as exc:
        if celery_task.request.retries < celery_task.max_retries:
            log.warning("job %s: transient error, retrying: %s", job_id, exc)
            raise celery_task.retry(exc=exc, countdown=2 ** celery_task.request.retries) from None
        _fail(rt, job_id, "unavailable", f"a backing service was unavailable after retries: {exc}")
    except Exception as exc:  # the job boundary: whatever went wrong, the job must end, with why
        log.exception("job %s failed", job_id)
        _fail(rt, job_id, "internal", f"the worker failed: {type(exc).__name__}: {exc}")


def _fail(rt: Runtime, job_id: str, code: str, message: str) -> None:
    metrics.JOBS.labels("failed", code).inc()
    try:
        rt.store.failed(job_id, code, message)
    except redis.RedisError:
        log.exception("could not record the failure of job %s", job_id)
