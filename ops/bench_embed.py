"""``lookalike bench embed``: the vision pipeline against the model alone, and micro-batching.

Measured in one run on the current device (CUDA when present), medians of ``reps`` runs:

- *raw forward*: the model (as the workers run it: traced and frozen channels_last on CPU, in
  bfloat16 there when ``LOOKALIKE_CPU_BFLOAT16`` says so; bfloat16 on CUDA) on a ready-made float
  batch of N, N = 1, 8, 32 (and 128 on CUDA);
- *pipeline*: N real catalog photos (JPEG bytes of ../shared/data/fashion-product-images) through
  what a micro-batch of N jobs does to them: decode (the worker's thread pool; on CUDA one nvJPEG
  call, :mod:`workers.gpu`), segmentation, letterbox and embedding in one forward pass of N, the
  category heads (without the catalog's votes, which need a worker's replicas);
- both with 1 and with 2 concurrent callers (a worker's two threads), and the ratio of the best
  pipeline to the best raw forward, paired: taken within each rep (the four timings run back to
  back), then the median over the reps, so that the machine's slow spells cancel;
- *where the pipeline's time goes*: with one caller, the wall time of each stage an image
  (:data:`STAGES`; "model" is its pass on the batch, L2-normalised, between the other steps),
  the steps around the model together, and what they may take for the pipeline to reach 0.9 of
  the model alone (a ninth of the model's time back to back);
- *through Celery*: a gateway and a worker (``-P threads -c 2``, as the Procfile) with
  micro-batching off (``LOOKALIKE_JOB_BATCH_SIZE=1``) and one with each size given, over the
  sample catalog topped up to catalog scale (:func:`fill_catalog`); S submitters (1, 4, 16) each
  submit a photo through the HTTP API, wait for it to end and submit the next (at least
  ``--min-jobs`` a row); the workers take turns within each round (:func:`celery_rows`); jobs/s
  (median of the rounds), its ratio to no batching (paired within each round, then the median)
  and latency p50/p95 (the jobs' own created-to-done times, over all rounds);
- *large uploads*: the steps before the model for photos of a phone's size (:data:`UPLOADS`,
  catalog photos scaled up with noise, :func:`phone_photos`), decoded whole against decoded
  reduced as the worker does (:func:`workers.decode.decode_reduced`), and how close each
  embedding comes to that of the catalog photo it was made from (:func:`upload_rows`);
- *search per job at catalog scale*: the worker's sharded index (``LOOKALIKE_PARTITIONS`` exact
  shards) holding as many random unit vectors as Fashion Product Images has photos; a
  micro-batch of N unfiltered jobs searched as the worker does (one search of the N, which gives
  the catalog's votes and the jobs' results) against the same N jobs each in a micro-batch of
  its own (N searches of one query), with a worker's OpenMP threads (cores divided among its
  threads, as the forward pass).
"""

from __future__ import annotations

import functools
import io
import math
import statistics
import tarfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ops.bench import DATA

CATALOG_VECTORS = 44_446  # products of Fashion Product Images (rows of its styles.csv)
STAGES = ("decode", "segment and crop", "letterbox and normalise", "model", "heads")  # timed with one caller


@dataclass
class ForwardRow:
    batch: int
    raw_per_s: dict[int, float]  # concurrent callers -> images/s of the model alone (median of the reps)
    pipeline_per_s: dict[int, float]  # concurrent callers -> images/s of the whole pipeline (median of the reps)
    ratio: float  # median over the reps of: best pipeline / best raw forward in that rep (paired)
    stages_ms: dict[str, float]  # STAGES -> ms an image with one caller (wall time, median of the reps)

    @property
    def model_ms(self) -> float:
        """ms an image of the model alone with one caller (from its median images/s)."""
        return 1000 / self.raw_per_s[1]

    @property
    def allowed_ms(self) -> float:
        """ms an image the steps around the model may take for the pipeline to reach 0.9 of the
        model alone: a ninth of :attr:`model_ms`."""
        return self.model_ms / 9

    @property
    def steps_ms(self) -> float:
        """ms an image of the pipeline's steps around the model, one caller: every stage but "model"."""
        return sum(ms for name, ms in self.stages_ms.items() if name != "model")

    @property
    def ratio_of_medians(self) -> float:
        """Best median pipeline / best median raw forward (the unpaired figure)."""
        return max(self.pipeline_per_s.values()) / max(self.raw_per_s.values())


@dataclass
class CeleryRow:
    batch_size: int  # LOOKALIKE_JOB_BATCH_SIZE; 1 = no micro-batching
    submitters: int
    jobs_per_s: float  # median of the rounds
    vs_off: float  # median of the rounds' jobs_per_s / no batching's in the same round (1.0 for off)
    p50_ms: float
    p95_ms: float
    mean_batch: float  # jobs per micro-batch, from the worker's lookalike_worker_batch_jobs
    failed: int
    ran: int  # jobs the row's worker ran in its turns (lookalike_worker_batch_jobs): every job of the row


def photos(n: int) -> list[bytes]:
    """JPEG bytes of the first ``n`` 224 px catalog photos."""
    found = []
    with tarfile.open(DATA / "images-224.tar") as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                found.append(tar.extractfile(member).read())
                if len(found) == n:
                    break
    return found


def forward_rows(batches: list[int], reps: int, callers: tuple[int, ...] = (1, 2), say=print
                 ) -> tuple[str, list[ForwardRow]]:
    """(device, rows): raw forward and pipeline images/s at each batch size, with 1 and 2
    concurrent callers (a worker runs ``-c 2`` threads: one thread's decoding and segmentation
    overlap the other's forward pass; the model alone is measured the same way, and the ratio
    takes the best of each), and each row's :data:`STAGES` timed with one caller.

    Raises:
        ValueError: ``callers`` lacks 1 (the stages are timed with one caller).
    """
    if 1 not in callers:
        raise ValueError(f"callers {callers} must include 1: the pipeline's stages are timed with one caller")
    import torch

    from schemas.settings import WorkerSettings
    from workers import gpu
    from workers.classify import DEFAULT_DIR, CategoryHeads
    from workers.decode import decode
    from workers.embed import INPUT_PX, Embedder, unit_rows
    from workers.segment import Segmenter

    settings = WorkerSettings()
    heads = CategoryHeads(DEFAULT_DIR)
    heads.load()
    data = photos(max(batches) * 2 * max(callers))
    pool = ThreadPoolExecutor(settings.decode_threads)
    rows = []
    for n in batches:
        embedder = Embedder.from_settings(settings, max_batch=n)
        embedder.load()
        segmenter = Segmenter(embedder.device)
        on_device = gpu.wanted(settings.device_preprocess, embedder.device)  # as the worker decides
        dtype = torch.bfloat16 if embedder.device.type == "cuda" else torch.float32
        x = torch.randn(n, 3, INPUT_PX, INPUT_PX, device=embedder.device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        rounds = max(2, 64 // n)  # at least 64 images per caller per timing at small batches

        def raw(caller: int) -> None:
            for _ in range(rounds):
                embedder.forward(x)
            if embedder.device.type == "cuda":
                torch.cuda.synchronize()

        def pipeline(caller: int, stages: list[float] | None = None) -> None:
            """The pipeline, ``rounds`` times; adds each stage's seconds to ``stages`` (STAGES' order)."""
            for r in range(rounds):
                chunk = [data[((r * max(callers) + caller) * n + i) % len(data)] for i in range(n)]
                clock = [time.perf_counter()]
                if on_device:
                    pixels = gpu.decode_on(embedder.device, chunk, settings.max_pixels)
                else:  # as the worker: in its pool when there are several
                    pixels = list((pool.map if n > 1 else map)(lambda b: decode(b, settings.max_pixels), chunk))
                clock.append(time.perf_counter())
                crops = [crop for crop, _ in segmenter.crop_all(pixels)]
                clock.append(time.perf_counter())
                x = embedder.prepare(crops)  # embedder.embed(crops) in two stages
                clock.append(time.perf_counter())
                features = unit_rows(embedder.forward(x))  # waits for CUDA
                clock.append(time.perf_counter())
                heads.predict(features)  # the heads alone: the catalog's votes need the replicas
                clock.append(time.perf_counter())
                if stages is not None:
                    for i in range(len(STAGES)):
                        stages[i] += clock[i + 1] - clock[i]

        raw(0), pipeline(0)  # warm up (tracing specialises to the batch shape)
        times = {(kind, c): [] for kind in ("raw", "pipeline") for c in callers}
        stages = []  # per rep: seconds of each of STAGES, one caller
        with ThreadPoolExecutor(max(callers)) as threads:
            for _ in range(reps):  # interleaved, so the machine's noise hits all alike
                for (kind, c), took in times.items():
                    run = raw if kind == "raw" else pipeline
                    if kind == "pipeline" and c == 1:  # in a pool thread too, as every other timing
                        stages.append([0.0] * len(STAGES))
                        run = functools.partial(pipeline, stages=stages[-1])
                    start = time.perf_counter()
                    list(threads.map(run, range(c)))
                    took.append(time.perf_counter() - start)
        rates = {key: [key[1] * rounds * n / t for t in took] for key, took in times.items()}
        paired = [max(rates["pipeline", c][r] for c in callers) / max(rates["raw", c][r] for c in callers)
                  for r in range(reps)]
        row = ForwardRow(n, {c: statistics.median(rates["raw", c]) for c in callers},
                         {c: statistics.median(rates["pipeline", c]) for c in callers}, statistics.median(paired),
                         {name: statistics.median(rep[i] for rep in stages) * 1000 / (rounds * n)
                          for i, name in enumerate(STAGES)})
        say(f"  batch {n}: raw " + ", ".join(f"{v:.1f}" for v in row.raw_per_s.values())
            + " img/s, pipeline " + ", ".join(f"{v:.1f}" for v in row.pipeline_per_s.values())
            + f" img/s with {', '.join(map(str, callers))} caller(s); ratio {row.ratio:.2f} paired"
            + f" ({row.ratio_of_medians:.2f} of the medians)")
        say("    one caller, ms an image: " + ", ".join(f"{k} {v:.2f}" for k, v in row.stages_ms.items())
            + f"; steps around the model {row.steps_ms:.2f}, where 0.9 of the model alone"
            + f" ({row.model_ms:.2f} back to back) allows {row.allowed_ms:.2f}")
        rows.append(row)
    pool.shutdown()
    return f"{embedder.device}, {embedder.precision}", rows


@dataclass
class SearchRow:
    batch: int  # jobs in the micro-batch
    batched_ms: float  # per job: one search of the batch (votes and results), median of the reps
    per_job_ms: float  # per job: one search per job (each job a micro-batch of its own)


def search_rows(batches: list[int], reps: int, catalog: int = CATALOG_VECTORS, say=print) -> list[SearchRow]:
    """Search time per job in a micro-batch of N unfiltered jobs (module docstring), k = 10, with a
    worker's OpenMP threads."""
    from schemas.settings import WorkerSettings
    from workers.classify import KNN_K
    from workers.embed import DIM
    from workers.shards import IndexPolicy, ShardSet

    settings = WorkerSettings()
    rng = np.random.default_rng(0)
    vectors = _unit_vectors(rng, catalog)
    shards = ShardSet(settings.partitions, DIM, IndexPolicy.from_settings(settings), settings.model_threads())
    for number, shard in enumerate(shards.shards):
        shard.upsert(np.arange(number, catalog, settings.partitions), vectors[number::settings.partitions])
    rows = []
    for n in batches:
        queries = vectors[rng.choice(catalog, n, replace=False)]
        queries += 0.05 * rng.standard_normal((n, DIM), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        batched, per_job = [], []
        for _ in range(reps):
            start = time.perf_counter()
            shards.search(queries, KNN_K)
            middle = time.perf_counter()
            for query in queries:
                shards.search(query[None], KNN_K)
            batched.append((middle - start) / n * 1000)
            per_job.append((time.perf_counter() - middle) / n * 1000)
        row = SearchRow(n, statistics.median(batched), statistics.median(per_job))
        say(f"  {n} job(s): {row.batched_ms:.1f} ms a job with one search of the batch, {row.per_job_ms:.1f} "
            f"with one search per job ({catalog} vectors, {settings.model_threads()} thread(s))")
        rows.append(row)
    return rows


UPLOAD_STAGES = ("decode", "segment and crop", "letterbox and normalise")  # before the model, one photo
# (width, height), format: a web upload's 1.5 MP, a phone's 12 MP and a phone's screenshot (2.9 MP, PNG)
UPLOADS = [((1080, 1440), "JPEG"), ((3024, 4032), "JPEG"), ((1170, 2532), "PNG")]


@dataclass
class UploadRow:
    size: tuple[int, int]  # width, height of the upload
    format: str  # JPEG or PNG
    kib: float  # mean file size
    whole_ms: dict[str, float]  # UPLOAD_STAGES -> ms a photo, decoded whole (median of the reps)
    reduced_ms: dict[str, float]  # the same, decoded reduced as the worker does (decode_reduced)
    decoded: tuple[int, int]  # width, height of the reduced decoding
    cosine: dict[str, float]  # "whole", "reduced" -> median cosine to the vector of the photo it was made from

    @property
    def ratio(self) -> float:
        """The steps before the model, whole over reduced."""
        return sum(self.whole_ms.values()) / sum(self.reduced_ms.values())


def phone_photos(originals: list[bytes], size: tuple[int, int], noise: float = 8.0, fmt: str = "JPEG") -> list[bytes]:
    """Catalog photos scaled up to ``size`` (bicubic) with Gaussian noise of ``noise`` levels, as
    JPEG quality 90 (or ``fmt``, Pillow's defaults): uploads of a phone's size (2-3 MB at 12 MP, as
    phones' own JPEGs are), from the data at hand, which holds no large photos."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for data in originals:
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.BICUBIC), np.float32)
        noisy = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buffer.getvalue())
    return out


def upload_rows(uploads: list[tuple[tuple[int, int], str]], reps: int, say=print) -> list[UploadRow]:
    """The steps before the model for one large upload (:func:`phone_photos`), one thread: decoded
    whole (:func:`workers.decode.decode`) against decoded reduced as the worker does for a whole
    photo (:func:`workers.decode.decode_reduced`, ``DECODE_MIN_PX``), the two in turn within each
    rep; and how close each one's embedding comes to that of the 224-px catalog photo it was made
    from (decoded, segmented and embedded as the worker does)."""
    from schemas.settings import WorkerSettings
    from workers.decode import decode, decode_reduced
    from workers.embed import DECODE_MIN_PX, Embedder
    from workers.segment import Segmenter, segmented

    settings = WorkerSettings()
    embedder = Embedder.from_settings(settings, max_batch=1)
    embedder.load()
    segmenter = Segmenter(embedder.device)
    ways = {"whole": lambda data: decode(data, settings.max_pixels),
            "reduced": lambda data: decode_reduced(data, settings.max_pixels, DECODE_MIN_PX).pixels}
    rows = []
    originals = photos(8)
    own = segmented(embedder.embed, segmenter)([decode(data, settings.max_pixels) for data in originals])
    for size, fmt in uploads:
        files = phone_photos(originals, size, fmt=fmt)
        took = {way: [] for way in ways}
        crops = {}
        for _ in range(reps + 1):  # the first a warm-up
            for way, decoder in ways.items():
                stages = [0.0] * len(UPLOAD_STAGES)
                for i, data in enumerate(files):
                    clock = [time.perf_counter()]
                    pixels = decoder(data)
                    clock.append(time.perf_counter())
                    crops[way, i] = segmenter.crop_all([pixels])[0][0]
                    clock.append(time.perf_counter())
                    embedder.prepare([crops[way, i]])
                    clock.append(time.perf_counter())
                    for stage in range(len(UPLOAD_STAGES)):
                        stages[stage] += (clock[stage + 1] - clock[stage]) * 1000 / len(files)
                took[way].append(stages)
        cosine = {way: float(np.median(np.sum(own * embedder.embed([crops[way, i] for i in range(len(files))]),
                                              axis=1))) for way in ways}
        ms = {way: {name: statistics.median(rep[stage] for rep in took[way][1:])
                    for stage, name in enumerate(UPLOAD_STAGES)} for way in ways}
        reduced = ways["reduced"](files[0])
        row = UploadRow(size, fmt, sum(map(len, files)) / len(files) / 1024, ms["whole"], ms["reduced"],
                        (reduced.shape[1], reduced.shape[0]), cosine)
        say(f"  {size[0]}x{size[1]} {fmt} ({row.kib:.0f} KiB): ms a photo before the model, whole "
            + ", ".join(f"{k} {v:.1f}" for k, v in row.whole_ms.items()) + f"; reduced to {row.decoded[0]}x"
            + f"{row.decoded[1]} " + ", ".join(f"{k} {v:.1f}" for k, v in row.reduced_ms.items())
            + f"; {row.ratio:.2f}x; cosine to the catalog photo's vector, median, whole {cosine['whole']:.4f}, "
            + f"reduced {cosine['reduced']:.4f}")
        rows.append(row)
    return rows


FILLER_TITLE = "bench filler"


def fill_catalog(engine, templates: list, model_version: str, partitions: int, total: int,
                 chunk: int = 2_000) -> int:
    """Add filler products to the catalog in PostgreSQL until ``total`` live products have a vector
    of ``model_version``, so that the Celery part searches a catalog of real size.

    Each filler product is one of ``templates`` (:class:`schemas.events.CatalogEvent` upserts, the
    sample's) in turn under a new id, version 1 and the title ``bench filler N``, with a random unit
    vector (float32, seed 0) in shard ``id % partitions`` and no thumbnail, written as the indexer
    writes (:func:`workers.catalog.write_upserts`). An exact scan costs the same whatever the
    vectors hold, and random ones lie far from every photo (cosine about 0), so filler never
    appears among the results. Ids follow the largest stored id. Workers started afterwards without
    ``LOOKALIKE_SNAPSHOT_DIR`` build their replicas from PostgreSQL, filler included.

    Returns:
        How many products were added (0 when the catalog already holds ``total``).

    Raises:
        ValueError: ``templates`` is empty.
    """
    import sqlalchemy as sa

    from schemas.tables import products
    from workers.catalog import Upsert, count_vectors, write_upserts

    if not templates:
        raise ValueError("no template products to copy: pass the sample's events")
    missing = total - count_vectors(engine, model_version)
    if missing <= 0:
        return 0
    with engine.connect() as conn:
        first = (conn.execute(sa.select(sa.func.max(products.c.id))).scalar_one() or 0) + 1
    rng = np.random.default_rng(0)
    for start in range(0, missing, chunk):
        ids = range(first + start, first + min(start + chunk, missing))
        with engine.begin() as conn:
            write_upserts(conn, [Upsert(templates[i % len(templates)].model_copy(update={
                "product_id": i, "version": 1, "title": f"{FILLER_TITLE} {i}"}), i % partitions, vector, None)
                for i, vector in zip(ids, _unit_vectors(rng, len(ids)))], model_version)
    return missing


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 (n, 1280): random directions, L2-normalised."""
    from workers.embed import DIM

    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def celery_rows(env: dict[str, str], log_dir: Path, batch_sizes: list[int], submitters: list[int],
                jobs_per_submitter: int, rounds: int = 3, min_jobs: int = 0, say=print) -> list[CeleryRow]:
    """Jobs/s and latency through the gateway and one worker per batch size, the configurations
    interleaved so that a slow stretch of a shared machine falls on all of them.

    Every worker (one per batch size, ``batch_sizes`` including 1: no micro-batching) is started
    first; only one at a time consumes the queue (Celery's remote control ``add_consumer`` /
    ``cancel_consumer``), and between turns no job is in flight. Each round runs every configuration
    once at each submitter count, in an order rotated from round to round, each submitter posting
    ``jobs_per_submitter`` jobs, or more where the row would hold fewer than ``min_jobs`` (12 jobs
    at 1 submitter last under a second; micro-batching's ratio to none there went from 0.84x to
    1.01x between the rounds of one run). A row's jobs/s is the median of its rounds, ``vs_off``
    the median of its rounds' ratios to no batching in the same round (paired), p50/p95 over the
    jobs of every round.

    Raises:
        ValueError: ``batch_sizes`` lacks 1, the baseline.
        RuntimeError: a worker did not come up or did not answer a remote-control command.
    """
    from celery import Celery

    from ops.bench_scale import SAMPLE, sample_value, start_gateway, worker_proc

    if 1 not in batch_sizes:
        raise ValueError(f"batch sizes {batch_sizes} must include 1: the rows are compared with no micro-batching")
    queries = [p.read_bytes() for p in sorted((SAMPLE / "queries").glob("*.jpg"))]
    control = Celery("bench-embed", broker=env["LOOKALIKE_REDIS_URL"], set_as_current=False).control
    tag = uuid.uuid4().hex[:6]
    workers = {size: worker_proc({**env, "LOOKALIKE_JOB_BATCH_SIZE": str(size)}, log_dir / f"worker-batch-{size}.log",
                                 f"bench-embed-{size}-{tag}") for size in batch_sizes}  # loading at once
    gateway = None
    try:
        for worker in workers.values():
            worker.wait(lambda w=worker: w.metrics() is not None, "a worker")
        nodes = worker_nodes(control, {size: f"bench-embed-{size}-{tag}@" for size in batch_sizes})
        for node in nodes.values():
            set_consuming(control, node, False)
        gateway, url = start_gateway(env, log_dir)
        rates: dict[tuple[int, int], list[float]] = {(b, s): [] for b in batch_sizes for s in submitters}
        latencies = {key: [] for key in rates}
        failed, batches, batched = dict.fromkeys(rates, 0), dict.fromkeys(rates, 0.0), dict.fromkeys(rates, 0.0)
        for r in range(rounds):
            order = batch_sizes[r % len(batch_sizes):] + batch_sizes[:r % len(batch_sizes)]
            for s in submitters:
                for size in order:
                    worker, key = workers[size], (size, s)
                    set_consuming(control, nodes[size], True)
                    if r == 0 and s == submitters[0]:  # its first turn: warm up
                        _submit(url, env["LOOKALIKE_REDIS_URL"], queries, 2, 4)
                    before = worker.metrics()
                    elapsed, took, lost = _submit(url, env["LOOKALIKE_REDIS_URL"], queries, s,
                                                  max(jobs_per_submitter, math.ceil(min_jobs / s)))
                    after = worker.metrics()
                    set_consuming(control, nodes[size], False)
                    rates[key].append(len(took) / elapsed)
                    latencies[key] += took
                    failed[key] += lost
                    batches[key] += (sample_value(after, "lookalike_worker_batch_jobs_count")
                                     - sample_value(before, "lookalike_worker_batch_jobs_count"))
                    batched[key] += (sample_value(after, "lookalike_worker_batch_jobs_sum")
                                     - sample_value(before, "lookalike_worker_batch_jobs_sum"))
            say(f"  round {r + 1} of {rounds}, jobs/s at job batch {' / '.join(map(str, batch_sizes))}: " + "; ".join(
                f"{s} submitter(s) " + " / ".join(f"{rates[size, s][-1]:.1f}" for size in batch_sizes)
                for s in submitters))
    finally:
        if gateway is not None:
            gateway.stop()
        for worker in workers.values():
            worker.stop()
    rows = []
    for (size, s), rate in rates.items():
        p50, p95 = np.percentile(latencies[size, s], [50, 95]) * 1000
        rows.append(CeleryRow(size, s, statistics.median(rate),
                              statistics.median(a / b for a, b in zip(rate, rates[1, s])), p50, p95,
                              batched[size, s] / max(batches[size, s], 1), failed[size, s], round(batched[size, s])))
    return rows


def worker_nodes(control, prefixes: dict, timeout_s: float = 30) -> dict:
    """The Celery node name of each worker (key -> the prefix of its ``-n`` name, e.g. ``name@``),
    key -> node, once all answer a ping (``control``: a Celery app's ``control`` on the broker)."""
    deadline = time.monotonic() + timeout_s
    while True:
        names = [name for reply in control.ping(timeout=1.0) for name in reply]
        found = {key: next((n for n in names if n.startswith(prefix)), None) for key, prefix in prefixes.items()}
        if all(found.values()):
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers {sorted(prefixes.values())} did not answer a ping within {timeout_s:.0f} s "
                               f"(answered: {names}); see their logs")


def set_consuming(control, node: str, on: bool) -> None:
    """Make worker ``node`` start (``on``) or stop consuming the vision queue, and wait for its reply."""
    from schemas.tasks import QUEUE_VISION

    command = control.add_consumer if on else control.cancel_consumer
    if not command(QUEUE_VISION, destination=[node], reply=True, timeout=10):
        raise RuntimeError(f"worker {node} did not answer {command.__name__}({QUEUE_VISION!r}) within 10 s")


def _submit(url: str, redis_url: str, queries: list[bytes], submitters: int, each: int
            ) -> tuple[float, list[float], int]:
    """``submitters`` threads, each submitting ``each`` jobs one after another: POST the photo, wait
    until the job ends, submit the next. One watcher thread reads the status of every job in
    flight with one Redis ``MGET`` every 5 ms (a poll per submitter thread cost the 2-core
    machine a quarter of its CPU at 16 submitters, taken from the worker being measured).
    Returns (elapsed s, created-to-done seconds of every job that ended done, jobs failed)."""
    import threading

    import httpx
    import redis

    from schemas.api import JobStatus
    from schemas.jobs import job_key

    client = redis.Redis.from_url(redis_url)
    waiting: dict[str, tuple[threading.Event, list[bytes]]] = {}  # job id -> (ended, [its status JSON])
    lock, stop = threading.Lock(), threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with lock:
                ids = list(waiting)
            for job_id, raw in zip(ids, client.mget([job_key(i) for i in ids]) if ids else []):
                if raw and (b'"status":"done"' in raw or b'"status":"failed"' in raw):  # compact JSON
                    with lock:
                        ended, out = waiting.pop(job_id)
                    out.append(raw)
                    ended.set()
            time.sleep(0.005)

    def one_submitter(k: int) -> list[float | None]:
        out = []
        with httpx.Client(timeout=30) as http:
            for i in range(each):
                photo = queries[(k * each + i) % len(queries)]
                job_id = http.post(f"{url}/v1/jobs", files={"image": ("q.jpg", photo)}).json()["job_id"]
                ended, raw = threading.Event(), []
                with lock:
                    waiting[job_id] = (ended, raw)
                if not ended.wait(120):
                    raise RuntimeError(f"job {job_id} did not end within 120 s; see the worker's log")
                status = JobStatus.model_validate_json(raw[0])
                out.append(status.updated_at - status.created_at if status.status.value == "done" else None)
        return out

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(submitters) as pool:
            results = [t for ts in pool.map(one_submitter, range(submitters)) for t in ts]
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        watcher.join()
        client.close()
    return elapsed, [t for t in results if t is not None], sum(t is None for t in results)
