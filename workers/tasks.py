"""The Celery vision worker: takes search jobs from queue ``vision`` and writes results to Redis.

Run it with ``celery -A workers.tasks worker -Q vision -P threads``: one process holds the
model and one replica of every shard, and its threads share them. The tasks are micro-batched
across jobs (celery-batches): each thread runs a batch of up to ``job_batch_size`` jobs through
:meth:`Runtime.run`, so the model, the heads, the catalog search and PostgreSQL see one call per batch.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import redis
import sqlalchemy as sa
import torch
from celery import Celery, signals
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task
from pydantic import ValidationError

from schemas.api import Box, Category, CategoryScore, EmbeddingResult, ProductHit, SearchResult
from schemas.jobs import JobStore
from schemas.settings import WorkerSettings
from schemas.tasks import QUEUE_VISION, TASK_EMBED, TASK_SEARCH, EmbedTask, SearchTask, transport_options
from workers import catalog, gpu, metrics
from workers.classify import DEFAULT_DIR, KNN_K, LEVELS, CategoryHeads, Neighbours, auto_category
from workers.decode import Decoded, decode_reduced
from workers.embed import DECODE_MIN_PX, Embedder
from workers.errors import CropRejected, InvalidInput, UploadExpired
from workers.fetch import Fetcher
from workers.replica import Replica
from workers.segment import Segmenter
from workers.shards import BLAS_FROM_QUERIES
from workers.sweep import LostMessageSweeper

log = logging.getLogger(__name__)

HIT_FIELDS = ("title", "gender", "master_category", "sub_category", "article_type", "base_colour")

app = Celery("lookalike", set_as_current=False)


@functools.cache
def worker_settings() -> WorkerSettings:
    """This process's settings, read once, when first needed (not at import)."""
    return WorkerSettings()


@app.on_configure.connect
def _configure(sender: Celery, **_) -> None:
    """Read settings when Celery first needs its configuration, not at import."""
    settings = worker_settings()
    sender.conf.update(
        broker_url=settings.redis_url,
        task_default_queue=QUEUE_VISION,
        task_ignore_result=True,  # results live in the job store
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A micro-batch can only gather the messages the worker holds unacknowledged (acks_late):
        # with -c threads, up to c x job_batch_size of them.
        worker_prefetch_multiplier=settings.job_batch_size,
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
        self.decode_on_device = gpu.wanted(settings.device_preprocess, self.embedder.device)
        self.heads = CategoryHeads(settings.heads_dir or DEFAULT_DIR)
        self.replica = Replica(settings, self.engine, self.store, self.embedder.dim)
        self.fetcher = Fetcher(settings)
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.sweeper = LostMessageSweeper(self.store, app, settings.visibility_timeout_s)

    def start(self) -> None:
        self.embedder.load()
        self.heads.load()
        self.replica.start()

    def run(self, jobs: list[Job]) -> list[Job]:
        """Run a micro-batch of jobs, each to ``done`` or ``failed``, stage by stage: bytes and
        decoding (a thread pool; on CUDA, bytes in the pool, then one nvJPEG call for the batch,
        :mod:`workers.gpu`), then one segmentation, one forward pass (``embed_batch`` images
        at a time), one search of the whole catalog (:meth:`_nearest`), one classification, and
        one metadata query for all of them; filtered searches and result writes per job. A job
        whose input is refused, or whose own step fails, ends alone; a batched step that fails is
        redone job by job, so one bad image fails only its own job.

        Returns:
            The jobs that met a transient error (PostgreSQL or Redis unavailable): not ended, to
            be retried.
        """
        metrics.BATCH_JOBS.observe(len(jobs))
        self._each(jobs, self._start, parallel=True)
        self._stage([job for job in jobs if job.data is not None], "decode", self._decode)
        self._stage([job for job in jobs if job.box is None and job.pixels is not None], "segment", self._segment)
        self._stage([job for job in jobs if job.vector is None], "embed", self._embed)
        searches = [job for job in jobs if isinstance(job.task, SearchTask)]
        self._stage(searches, "nearest", self._nearest)
        self._stage(searches, "classify", self._classify)
        self._each(searches, self._search)
        self._stage(searches, "join", self._join)
        self._each(jobs, self._finish)
        return [job for job in jobs if job.retry]

    def search(self, task: SearchTask) -> None:
        """Run one search job (a micro-batch of one); a transient error propagates."""
        self._single(task)

    def embed(self, task: EmbedTask) -> None:
        """Run one embedding job (a micro-batch of one); a transient error propagates."""
        self._single(task)

    def _single(self, task: SearchTask | EmbedTask) -> None:
        job = Job(task)
        if self.run([job]):
            raise job.retry

    # -- stages: each takes the jobs still live, sets their fields, and may raise ---------------

    def _start(self, job: Job) -> None:
        """Mark the job running (or end it here if it already ended: a redelivered message); the
        query's pixels (decoded, cropped when a box was given) or, for a product id, its stored vector.
        When decoding is on the device, the file's bytes instead, for :meth:`_decode`.

        Raises:
            UploadExpired: the upload left Redis before a worker took it.
            InvalidInput: the image was refused (fetch, decode, crop), or the product has no vector.
        """
        task = job.task
        started = self.store.running(task.job_id)
        if started is None:  # it ended already (a redelivered message): keep its outcome
            log.info("job %s already ended; message delivered again, not run again", task.job_id)
            job.ended = True
            return
        metrics.STAGE_SECONDS.labels("queue_wait").observe(max(0.0, started.updated_at - started.created_at))
        if getattr(task, "product_id", None) is not None:
            vector = catalog.fetch_vector(self.engine, task.product_id, self.embedder.model_version)
            if vector is None:
                raise InvalidInput(f"product {task.product_id} is not in the catalog or has no vector of model "
                                   f"{self.embedder.model_version} yet; try again once it is indexed",
                                   "unknown_product")
            job.vector = vector[None, :]
            return
        if task.image_url is not None:
            with _timed(job.timings, "fetch"):
                data = self.fetcher.fetch(task.image_url)
        else:
            data = self.store.take_upload(task.job_id)
            if data is None:
                raise UploadExpired("the uploaded image expired before a worker took it; submit the job again")
        if self.decode_on_device:
            job.data = data
            return
        with _timed(job.timings, "decode"):  # no larger than the product, or the caller's box, needs
            job.decoded = decode_reduced(data, self.settings.max_pixels, DECODE_MIN_PX, region=job.task.crop)
            job.pixels = job.decoded.pixels
        self._crop(job)

    def _decode(self, jobs: list[Job]) -> None:
        """Decode the batch's files on the model's device, in one call (:func:`workers.gpu.decode_on`)."""
        todo = [job for job in jobs if job.pixels is None]  # redone job by job after a failure: skip the done
        for job, pixels in zip(todo, gpu.decode_on(self.embedder.device, [job.data for job in todo],
                                               self.settings.max_pixels)):
            job.decoded = Decoded(pixels, width=pixels.shape[1], height=pixels.shape[0])  # whole
            job.pixels, job.data = pixels, None
        for job in jobs:
            if job.box is None:  # not cropped yet (the batch may be redone job by job after a bad crop box)
                self._crop(job)

    def _crop(self, job: Job) -> None:
        if job.task.crop is not None or self.segmenter is None:  # a caller's crop box wins over segmentation
            job.pixels, job.box = crop(job.decoded, job.task.crop)

    def _segment(self, jobs: list[Job]) -> None:
        for job, (pixels, box) in zip(jobs, self.segmenter.crop_all([job.pixels for job in jobs])):
            job.pixels, job.box = pixels, job.decoded.to_upload(box)

    def _embed(self, jobs: list[Job]) -> None:
        for job, vector in zip(jobs, self.embedder.embed([job.pixels for job in jobs])):
            job.vector = vector[None, :]

    def _nearest(self, jobs: list[Job]) -> None:
        """One search of the whole catalog for the batch: the catalog's votes (``KNN_K`` each), and
        the answer of every job that restricts nothing but ids (no filters, no category, or ``auto``
        choosing none), which :meth:`_search` takes from here instead of searching again (an exact
        scan of 44,446 vectors is about 20 ms a query on a worker's one thread, as much as the
        forward pass; README, Micro-batching). Sets ``job.nearest``."""
        k = max([KNN_K if self.settings.category_votes else 0]
                + [job.task.k + len(_excluded(job.task)) for job in jobs
                   if job.task.filters is None and job.task.category in (None, "auto")])
        if k:
            scores, ids = self.replica.shards.search(np.concatenate([job.vector for job in jobs]), k)
            for job, row_scores, row_ids in zip(jobs, scores, ids):
                job.nearest = (row_scores, row_ids)

    def _classify(self, jobs: list[Job]) -> None:
        vectors = np.concatenate([job.vector for job in jobs])
        neighbours = self._neighbours(jobs) if self.settings.category_votes else None
        for job, predicted in zip(jobs, self.heads.predict(vectors, neighbours=neighbours)):
            job.predicted = predicted

    def _neighbours(self, jobs: list[Job]) -> list[Neighbours]:
        """The ``KNN_K`` nearest catalog products of each job (of :meth:`_nearest`) with their
        categories, from one PostgreSQL query: the votes of :class:`CategoryHeads`."""
        nearest = [(scores[:KNN_K], ids[:KNN_K]) for scores, ids in (job.nearest for job in jobs)]
        rows = catalog.fetch_products(self.engine, sorted({int(i) for _, ids in nearest for i in ids if i >= 0}))
        return [[(float(s), {level: getattr(rows[int(i)], level) for level in LEVELS})
                 for s, i in zip(scores, ids) if int(i) in rows]
                for scores, ids in nearest]

    def _search(self, job: Job) -> None:
        task = job.task
        category = task.category
        if category == "auto":
            chosen = auto_category(job.predicted, self.settings.auto_category_min_prob)
            category = Category(level=chosen[0], value=chosen[1]) if chosen else None
        job.category = category
        with _timed(job.timings, "filter"):
            allowed = catalog.matching_ids(self.engine, task.filters, category)
            excluded = _excluded(task)
        if allowed is None and job.nearest is not None and len(job.nearest[1]) >= task.k + len(excluded):
            scores, ids = job.nearest  # the batch's search found this job's k, excluded ids aside
            keep = ~np.isin(ids, excluded)
            scores, ids = scores[keep][:task.k], ids[keep][:task.k]
        else:
            with _timed(job.timings, "search"):
                scores, ids = self.replica.shards.search(job.vector, task.k, allowed=allowed, excluded=excluded)
            scores, ids = scores[0], ids[0]
        job.found = [(int(i), float(s)) for i, s in zip(ids, scores) if i >= 0]

    def _join(self, jobs: list[Job]) -> None:
        rows = catalog.fetch_products(self.engine, sorted({i for job in jobs for i, _ in job.found}))
        for job in jobs:
            job.hits = [ProductHit(product_id=i, score=s, image_url=rows[i].image_url or f"/v1/products/{i}/image",
                                   **{f: getattr(rows[i], f) for f in HIT_FIELDS})
                        for i, s in job.found if i in rows]

    def _finish(self, job: Job) -> None:
        task, version = job.task, self.embedder.model_version
        if isinstance(task, EmbedTask):
            result = EmbeddingResult(model_version=version, box=job.box, dim=job.vector.shape[1],
                                     vector=job.vector[0].tolist())
        else:
            categories = {level: [CategoryScore(label=label, prob=prob) for label, prob in top]
                          for level, top in job.predicted.items()}
            result = SearchResult(model_version=version, box=job.box, products=job.hits,
                                  categories=categories, category=job.category)
        done = self.store.done(task.job_id, result, job.timings)
        job.ended = True
        metrics.JOBS.labels("done", "").inc()
        if isinstance(task, SearchTask):
            metrics.STAGE_SECONDS.labels("total").observe(max(0.0, done.updated_at - done.created_at))

    # -- running stages: errors end the job they belong to -------------------------------------

    def _each(self, jobs: list[Job], step, parallel: bool = False) -> None:
        """``step(job)`` for each live job (in the decode pool when ``parallel``); a job whose step
        raises ends with why (:meth:`_end`)."""
        live = [job for job in jobs if job.live]
        if parallel and len(live) > 1:
            outcomes = list(self.pool.map(lambda job: _outcome(step, job), live))
        else:
            outcomes = [_outcome(step, job) for job in live]
        for job, exc in zip(live, outcomes):
            if exc is not None:
                self._end(job, exc)

    def _stage(self, jobs: list[Job], stage: str, step) -> None:
        """``step(live jobs)`` once for the batch (the jobs that take part in the stage), its time in
        each job's ``timings[stage]``; if it raises, it is redone job by job so only the jobs whose
        own input fails end."""
        live = [job for job in jobs if job.live]
        if not live:
            return
        started = time.perf_counter()
        exc = _outcome(step, live)
        if exc is not None and len(live) > 1:
            log.warning("%s of a batch of %d failed (%s); redoing it job by job", stage, len(live), exc)
            self._each(live, lambda job: step([job]))
        elif exc is not None:
            self._end(live[0], exc)
        elapsed = time.perf_counter() - started
        for job in live:
            job.timings[stage] = elapsed
            metrics.STAGE_SECONDS.labels(stage).observe(elapsed)

    def _end(self, job: Job, exc: BaseException) -> None:
        """End ``job`` because of ``exc``: ``failed`` with the reason of an invalid input or of a
        worker error, or marked for retry after a transient error."""
        if isinstance(exc, TRANSIENT):
            job.retry = exc
            return
        if isinstance(exc, InvalidInput):
            code, message = exc.code, exc.message
            metrics.JOBS.labels("failed" if isinstance(exc, UploadExpired) else "rejected", code).inc()
        else:
            log.error("job %s failed", job.task.job_id, exc_info=exc)
            code, message = "internal", f"the worker failed: {type(exc).__name__}: {exc}"
            metrics.JOBS.labels("failed", code).inc()
        job.ended = True
        try:
            self.store.failed(job.task.job_id, code, message, job.timings)
        except TRANSIENT as lost:
            job.retry, job.ended = lost, False


@dataclass(eq=False)
class Job:
    """One job of a micro-batch as it moves through :meth:`Runtime.run`."""

    task: SearchTask | EmbedTask
    timings: dict[str, float] = field(default_factory=dict)
    data: bytes | None = None  # the image file, while it waits for decoding on the device
    pixels: np.ndarray | torch.Tensor | None = None  # uint8 (H, W, 3) RGB: decoded, then cropped
    decoded: Decoded | None = None  # the upload decoded (maybe reduced), with its size, for the boxes
    box: Box | None = None  # the part of the upload that was embedded, in pixels of the upload
    vector: np.ndarray | None = None  # float32 (1, 1280), L2-normalised
    predicted: dict = field(default_factory=dict)  # level -> [(label, prob)], of CategoryHeads.predict
    category: Category | None = None  # the search was restricted to it
    nearest: tuple[np.ndarray, np.ndarray] | None = None  # the batch's unfiltered search: scores, ids (k,)
    found: list[tuple[int, float]] = field(default_factory=list)  # (product id, score), best first
    hits: list[ProductHit] = field(default_factory=list)
    ended: bool = False  # done or failed, written to the job store
    retry: BaseException | None = None  # the transient error that stopped it

    @property
    def live(self) -> bool:
        return not self.ended and self.retry is None


def _excluded(task: SearchTask) -> np.ndarray:
    """int64 (M,): the ids a search must not return, the query's own product among them."""
    return np.array([*task.exclude_ids, *([task.product_id] if task.product_id else [])], dtype=np.int64)


def _outcome(step, arg) -> BaseException | None:
    try:
        step(arg)
    except Exception as exc:  # the stage runners decide what it means for the job
        return exc
    return None


def crop(decoded: Decoded, box: Box | None) -> tuple[np.ndarray | torch.Tensor, Box]:
    """The part of the decoded upload inside ``box`` (the whole image when None).

    Args:
        decoded: The upload decoded, maybe reduced (:func:`decode_reduced`; on the device, whole).
        box: In pixels of the upload.

    Returns:
        uint8 (h, w, 3) RGB of ``decoded.pixels`` (an array, or a tensor on the model's device), and
        the box used, in pixels of the upload.

    Raises:
        CropRejected: the box does not lie inside the image.
    """
    width, height = decoded.width, decoded.height
    if box is None:
        return decoded.pixels, Box(x=0, y=0, w=width, h=height)
    if box.x + box.w > width or box.y + box.h > height:
        raise CropRejected(f"the crop box x={box.x} y={box.y} w={box.w} h={box.h} reaches past the image, which is "
                           f"{width}x{height} px (after EXIF rotation); keep x+w <= {width} and y+h <= {height}")
    inner = decoded.from_upload(box)
    return decoded.pixels[inner.y:inner.y + inner.h, inner.x:inner.x + inner.w], box


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
            rt = Runtime(worker_settings())
            rt.start()
            _runtime = rt
        return _runtime


@signals.worker_ready.connect
def _warm_up(sender=None, **_) -> None:
    rt = runtime()
    metrics.serve(rt.settings.metrics_host, rt.settings.metrics_port)
    rt.sweeper.start(getattr(sender, "hostname", None) or "worker")


@signals.worker_shutdown.connect
def _shut_down(**_) -> None:
    if _runtime is not None:
        _runtime.sweeper.stop()
        _runtime.replica.stop()
        _runtime.fetcher.close()
        _runtime.pool.shutdown()


TRANSIENT = (sa.exc.OperationalError, sa.exc.InterfaceError, redis.ConnectionError, redis.TimeoutError)


class JobBatches(Batches):
    """A Celery task run on micro-batches of its messages (celery-batches), batched dynamically:
    while a pool thread is idle, a message is flushed as soon as it arrives (no wait at low load);
    while every thread runs a batch, messages gather until ``job_batch_size`` of them are buffered
    or a thread is free again (checked every ``job_batch_wait_ms``), which then takes them all if
    4 or more wait, else the first alone (:meth:`flush`). Settings are read when the worker starts
    consuming, not at import."""

    max_retries = 3

    def __init__(self) -> None:
        super().__init__()
        self._running = 0  # batches handed to the pool and not finished
        self._running_lock = threading.Lock()

    def _busy(self) -> bool:
        return self._pool is not None and self._running >= (getattr(self._pool, "limit", None) or 1)

    @property
    def flush_every(self) -> int:
        """Read by celery-batches on every message: 1 (flush now) while a thread is idle."""
        return worker_settings().job_batch_size if self._busy() else 1

    @property
    def flush_interval(self) -> float:
        return worker_settings().job_batch_wait_ms / 1000

    def _do_flush(self) -> None:
        if self._busy() and self._buffer.qsize() < worker_settings().job_batch_size:
            return  # keep gathering until a thread is free
        super()._do_flush()

    def flush(self, requests) -> None:
        """As :meth:`Batches.flush`, in batches of at most ``job_batch_size`` (a thread freed after
        a long wait may find more buffered), each counted as running until it returns. Fewer than
        :data:`workers.shards.BLAS_FROM_QUERIES` (4) jobs are not batched: this thread takes the
        first and the rest go back to the buffer for the next thread that is free. Batches that
        small share no catalog scan, and one thread running them holds back every result to the
        last (a batch's jobs end together): p95 at 4 submitters was worse than without batching
        (README, Micro-batching)."""
        size, requests = worker_settings().job_batch_size, list(requests)
        if size > 1 and len(requests) < BLAS_FROM_QUERIES:
            for request in requests[1:]:
                self._buffer.put(request)
            requests = requests[:1]
        for i in range(0, len(requests), size):
            self._submit(requests[i:i + size])

    def _submit(self, requests: list) -> None:
        with self._running_lock:
            self._running += 1
        acks_late = [r for r in requests if r.task.acks_late]
        acks_early = [r for r in requests if not r.task.acks_late]

        def run(*args):  # however the batch ends, its thread counts as free again
            try:
                return apply_batches_task(*args)
            finally:
                with self._running_lock:
                    self._running -= 1

        def on_accepted(pid: int, time_accepted: float) -> None:
            for request in acks_early:
                request.acknowledge()

        def on_return(result) -> None:
            for request in acks_late:
                request.acknowledge()

        self._pool.apply_async(run, (self, ([SimpleRequest.from_request(r) for r in requests],), 0, None),
                               accept_callback=on_accepted, callback=on_return)


@app.task(name=TASK_SEARCH, base=JobBatches)
def search(requests: list[SimpleRequest]) -> None:
    """Celery task ``lookalike.search``; each message's payload is a :class:`schemas.tasks.SearchTask` as a dict."""
    _run_batch(search, SearchTask, requests)


@app.task(name=TASK_EMBED, base=JobBatches)
def embed(requests: list[SimpleRequest]) -> None:
    """Celery task ``lookalike.embed``; each message's payload is a :class:`schemas.tasks.EmbedTask` as a dict."""
    _run_batch(embed, EmbedTask, requests)


def _run_batch(celery_task: JobBatches, model: type[SearchTask] | type[EmbedTask],
               requests: list[SimpleRequest]) -> None:
    """The job boundary: run a micro-batch; send a job that met a transient error back to the
    queue (backing off 1, 2, 4 s) up to ``max_retries`` times, then end it ``unavailable``; if the
    batch itself breaks, end every job it did not end, with why. Never raises."""
    rt = runtime()
    jobs, payloads = [], {}
    for request in requests:
        payload = request.args[0] if request.args else request.kwargs.get("payload")
        try:
            job = Job(model.model_validate(payload))
        except ValidationError as exc:
            job_id = payload.get("job_id") if isinstance(payload, dict) else None
            log.error("message %s is not a valid %s: %s", request.id, model.__name__, exc)
            if isinstance(job_id, str):
                _fail(rt, job_id, "internal", f"the job's message was not valid: {exc}")
            continue
        jobs.append(job)
        payloads[id(job)] = (request, payload)
    try:
        retry = rt.run(jobs)
    except Exception as exc:  # a bug in the batch runner: no job may stay `running`
        log.exception("a batch of %d jobs failed", len(jobs))
        for job in jobs:
            if not job.ended:
                _fail(rt, job.task.job_id, "internal", f"the worker failed: {type(exc).__name__}: {exc}")
        return
    for job in retry:
        request, payload = payloads[id(job)]
        retries = int((request.request_dict or {}).get("retries") or 0)
        if retries >= celery_task.max_retries:
            _fail(rt, job.task.job_id, "unavailable", f"a backing service was unavailable after retries: {job.retry}")
            continue
        log.warning("job %s: transient error, retrying: %s", job.task.job_id, job.retry)
        try:
            celery_task.apply_async(args=[payload], task_id=request.id, countdown=2 ** retries, retries=retries + 1)
        except Exception as exc:  # the broker is Redis too: if it is down, the job cannot go back
            _fail(rt, job.task.job_id, "unavailable", f"could not requeue after a transient error ({exc})")


def _fail(rt: Runtime, job_id: str, code: str, message: str) -> None:
    metrics.JOBS.labels("failed", code).inc()
    try:
        rt.store.failed(job_id, code, message)
    except redis.RedisError:
        log.exception("could not record the failure of job %s", job_id)
