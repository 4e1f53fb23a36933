"""Settings, one class per process kind, read from ``LOOKALIKE_*`` environment variables.

Build them in an entry point (app factory, worker init, indexer ``main()``),
never at import time, so a test or a launcher can set the environment first.

Hierarchy::

    Settings                 shared: where Postgres, Redis and Kafka are; topic names
    ├── GatewaySettings      HTTP limits
    ├── FetchSettings        fetching images by URL (SSRF guard, timeouts, size)
    └── ModelSettings        the embedding model and where it runs; the metrics port
        ├── WorkerSettings   replicas of the shards (+ FetchSettings)
        └── IndexerSettings  consumer group, batching, image sources (+ FetchSettings)
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where the services are and what the topics are called."""

    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", extra="ignore")

    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/lookalike"
    redis_url: str = "redis://127.0.0.1:6379/0"
    kafka_bootstrap: str = "127.0.0.1:9092"
    products_topic: str = "catalog.products"
    vectors_topic: str = "catalog.vectors"
    dlq_topic: str = "catalog.products.dlq"
    partitions: int = Field(4, ge=1, description="Partitions of the catalog topics = FAISS shards.")
    job_ttl_s: int = Field(3600, ge=60, description="How long a job's status and result stay in Redis.")
    max_pixels: int = Field(4096 * 4096, ge=32 * 32, description="Largest decoded image, width x height.")
    visibility_timeout_s: int = Field(60, ge=5, description=(
        "Seconds a job taken by a worker may stay unacknowledged before Redis hands it to another worker "
        "(a worker killed mid-job has its jobs back in the queue this long, plus up to 2 s, after it took them); must exceed "
        "the longest job, queue wait behind the worker's own jobs included, or a slow job runs twice."))
    snapshot_dir: Path | None = Field(None, description=(
        "Where the indexer writes shard snapshots and workers read them (a shared volume); "
        "unset: no snapshots, workers build their replicas from PostgreSQL."))
    shard_exact_max: int = Field(50_000, ge=1, description=(
        "Most vectors of an exact (flat) shard; past it the shard becomes IVF-Flat (see workers/shards.py)."))
    shard_nprobe: int = Field(32, ge=1, description="Inverted lists an IVF shard searches per query (recall vs time).")


PLACEHOLDER_DIGESTS = {hashlib.sha256(key.encode()).hexdigest(): key
                       for key in ("", "changeme", "change-me", "secret", "password", "test", "api-key")}


class GatewaySettings(Settings):
    """The HTTP gateway."""

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest accepted upload.")
    default_k: int = Field(10, ge=1, le=100)
    max_wait_s: float = Field(30.0, ge=0, le=120, description=(
        "Longest long-poll of `GET /v1/jobs/{id}?wait_s=` and `/similar`; keep it under the proxy's idle timeout."))
    max_queue_depth: int = Field(1000, ge=0, description=(
        "Jobs waiting in the `vision` queue past which new jobs get 503 + Retry-After; 0 = no limit."))
    queue_retry_after_s: int = Field(5, ge=1, description="The Retry-After of a 503 for a full queue.")
    read_only: bool = Field(False, description=(
        "Refuse catalog writes (`POST /v1/products`, `DELETE /v1/products/{id}`) whatever the keys."))
    api_key_sha256: list[str] = Field(default_factory=list, description=(
        "SHA-256 hex digests of the API keys allowed to write the catalog (JSON list); none = no writes. "
        "Make one with `printf %s \"$KEY\" | sha256sum`."))
    write_rate_per_min: int = Field(120, ge=0, description=(
        "Catalog write requests one API key may make per minute (fixed one-minute windows in Redis); "
        "past it 429 + Retry-After; 0 = no limit."))
    max_catalog_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest `POST /v1/products` body.")
    similar_wait_s: float = Field(10.0, ge=0, le=120, description=(
        "How long `/v1/products/{id}/similar` waits for its job when the request gives no `wait_s`."))

    @field_validator("api_key_sha256")
    @classmethod
    def _real_digests(cls, digests: list[str]) -> list[str]:
        for digest in digests:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"LOOKALIKE_API_KEY_SHA256 holds {digest[:80]!r}, which is not a SHA-256 hex digest "
                                 "(64 lowercase hex digits); store the digest of each key, never the key")
            if digest in PLACEHOLDER_DIGESTS:
                raise ValueError(f"LOOKALIKE_API_KEY_SHA256 holds the digest of the placeholder key "
                                 f"{PLACEHOLDER_DIGESTS[digest]!r}; generate a random key (`openssl rand -hex 32`)")
        return digests


class FetchSettings(Settings):
    """Fetching an image by URL (``workers.fetch``)."""

    fetch_allow_private: bool = Field(False, description=(
        "Allow URLs that resolve to private (10/8, 172.16/12, 192.168/16, fc00::/7) and loopback addresses; "
        "for development and tests only. Link-local, multicast, reserved and unspecified stay refused."))
    fetch_connect_timeout_s: float = Field(3.0, gt=0, description="Longest wait to connect to a URL's host.")
    fetch_read_timeout_s: float = Field(10.0, gt=0, description="Longest wait for the next bytes of a response.")
    fetch_total_timeout_s: float = Field(20.0, gt=0, description="Longest time for a whole fetch, redirects included.")
    fetch_max_redirects: int = Field(3, ge=0, le=10, description="Most redirects followed, each checked again.")
    fetch_attempts: int = Field(3, ge=1, le=10, description=(
        "Tries per image URL when the failure may pass (timeout, connection error, HTTP 429 or 5xx), "
        "with exponential backoff from 0.5 s; a catalog event's image is dead-lettered after the last."))
    fetch_max_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest image fetched by URL.")
    fetch_concurrency: int = Field(8, ge=1, le=64, description=(
        "Indexer: image URLs of one micro-batch fetched at once, so a batch waits about one fetch, not the sum."))
    fetch_ca_file: Path | None = Field(None, description=(
        "PEM file of the certificate authorities to trust for https image URLs instead of the system's "
        "(a private CA); unset = the certifi bundle."))


class ModelSettings(Settings):
    """The embedding model; the worker and the indexer must agree on ``model_version``.

    Also where the process serves ``/metrics``: workers and indexers are not HTTP servers,
    so each runs a small one of its own on ``metrics_host:metrics_port``.
    """

    model_version: str = Field("effnet-lite0-imagenet-gap-seg-v2", description=(
        "Recorded with every vector; change it whenever the model or the preprocessing changes "
        "(v2: segmentation on; the v1 vectors were of whole images)."))
    segment: bool = Field(True, description=(
        "Crop to the product and paint its background white before embedding (workers.segment); "
        "the same in the worker and the indexer, so catalog and query vectors are made alike."))
    device: str = Field("auto", description="`auto` (CUDA when present), `cpu` or `cuda[:N]`.")
    torch_threads: int = Field(0, ge=0, description=(
        "torch intra-op threads; 0 = automatic: in a worker the cores shared among its threads "
        "(`worker_threads`), elsewhere torch's default (all cores)."))
    cpu_bfloat16: Literal["auto", "on", "off"] = Field("auto", description=(
        "On the CPU, run the model in bfloat16 (autocast; vectors at cosine 0.988 or more of float32's, median 0.9988): "
        "`auto` when the CPU multiplies bfloat16 in hardware (AMX: Intel Sapphire Rapids and later; AVX-512 BF16: "
        "Intel Cooper Lake, AMD Zen 4 and later; workers.embed.has_native_bfloat16), where the pipeline did 1.5x "
        "float32's img/s and more, at batch 8 against 1 (README, bfloat16 on the CPU); `on` always (not measured "
        "on other CPUs), `off` never."))
    embed_batch: int = Field(0, ge=0, le=1024, description=(
        "Most images in one forward pass; 0 = automatic: 1 on a CPU in float32, 8 in bfloat16 "
        "(`cpu_bfloat16`), 128 on CUDA. On a CPU in float32 the "
        "images of a micro-batch go through one at a time: on 2 cores, 1 torch thread each as in a "
        "worker, Lite0 did 63.8 / 57.4 / 48.4 img/s at 1 / 2 / 4 (2-core AMD EPYC; on an Intel Xeon "
        "1 and 4 were even), and from 8 up its activations (38.5 MB at 8) pass glibc's 32 MiB mmap "
        "ceiling and are faulted in afresh every pass (workers.embed.keep_freed_memory). On a GPU "
        "larger is faster; lower it on out-of-memory errors."))
    metrics_host: str = Field("127.0.0.1", description="Address of this process's /metrics; 0.0.0.0 in a container.")
    metrics_port: int = Field(0, ge=0, le=65535, description=(
        "Port of this process's /metrics; 0 picks a free one and logs it. The Procfile passes honcho's "
        "$PORT, so several workers or indexers on one host never collide."))

    def model_threads(self) -> int:
        """torch intra-op threads for :class:`workers.embed.Embedder`: ``torch_threads``; 0 = torch's default."""
        return self.torch_threads

    def bfloat16(self) -> bool | None:
        """``cpu_bfloat16`` for :class:`workers.embed.Embedder`: None (auto), True or False."""
        return {"auto": None, "on": True, "off": False}[self.cpu_bfloat16]


class WorkerSettings(ModelSettings, FetchSettings):
    """A Celery vision worker: the model, its replicas of the shards, and image URLs."""

    replica_poll_ms: int = Field(200, ge=10, description="Longest wait of one changelog poll.")
    replica_status_interval_s: float = Field(1.0, gt=0, description="How often a worker reports its replicas to Redis.")
    heads_dir: str = Field("", description="Category heads (a `lookalike train --out` directory); empty: the "
                                           "ones shipped in workers/models/.")
    device_preprocess: Literal["auto", "on", "off"] = Field("auto", description=(
        "Decode JPEG photos (nvJPEG, one call per micro-batch), segment, crop and letterbox them on the model's "
        "device (workers/gpu.py): `auto` on CUDA only, `on` on the CPU too (slower there than Pillow; for "
        "tests), `off` never."))
    category_votes: bool = Field(True, description=(
        "Blend the category heads with the categories of the query's 10 nearest catalog products "
        "(workers/classify.py); false: the heads alone."))
    auto_category_min_prob: float = Field(0.7, ge=0, le=1, description=(
        "`category: auto` searches within the most specific predicted level whose top probability is at least this."))
    job_batch_size: int = Field(8, ge=1, le=256, description=(
        "Micro-batch: most jobs run together (one segmentation, forward passes of `embed_batch` images, "
        "one catalog search, one classification, one metadata query); 1 = no batching. 8 measured best on "
        "2 CPU cores at catalog scale (README, Micro-batching): the catalog search is shared from 4 jobs "
        "up (workers/shards.py, BLAS_FROM_QUERIES). A job that arrives while a worker thread is idle runs "
        "at once; while all are busy, jobs gather up to this many, and a thread that is free again takes them "
        "all from 4 up, else one (README, Micro-batching: p95 at 4 submitters)."))
    @field_validator("job_batch_size")
    @classmethod
    def _batches_that_form(cls, size: int) -> int:
        if size in (2, 3):  # workers/shards.py BLAS_FROM_QUERIES: under 4 jobs a thread takes one job alone
            raise ValueError(f"LOOKALIKE_JOB_BATCH_SIZE {size} would never batch: micro-batches of fewer than 4 "
                             "jobs are not formed (they share no catalog search); use 1 (no batching) or 4 or more")
        return size

    job_batch_wait_ms: float = Field(5.0, gt=0, le=10_000, description=(
        "Micro-batch: while every worker thread is busy, how often to look whether one is free again "
        "(the jobs gathered meanwhile are then flushed)."))
    decode_threads: int = Field(2, ge=1, le=64, description="Threads fetching and decoding the images of a batch.")
    worker_threads: int = Field(2, ge=1, le=256, description=(
        "Celery threads of this worker process (`-c` in the Procfile and compose, which read this variable)."))

    def model_threads(self) -> int:
        """``torch_threads``, or when 0 this process's cores divided among its ``worker_threads`` (at
        least 1): each thread runs its own forward passes, and more OpenMP threads than cores stall
        each other (2 cores, 2 threads: the pipeline ran 25-30% more images/s at batch 1 with 1 torch
        thread each than with torch's default of 2; README, Micro-batching)."""
        return self.torch_threads or max(1, len(os.sched_getaffinity(0)) // self.worker_threads)


class IndexerSettings(ModelSettings, FetchSettings):
    """The Kafka indexer (consumer group on the products topic); fetches ``image.url`` like a worker."""

    group_id: str = "indexer"
    batch_size: int = Field(32, ge=1, le=1024, description="Most events embedded and written in one micro-batch.")
    poll_timeout_ms: int = Field(100, ge=1, description="Longest wait for one micro-batch to fill.")
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    topic_check_interval_s: float = Field(
        5.0, gt=0, description="How often the indexer checks that the broker still has the catalog topics.")
    image_roots: list[Path] = Field(
        default_factory=list,
        description="Directories an event's `image.path` may point into; empty refuses every path.",
    )
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest image in an event.")
    thumbnail_px: int = Field(160, ge=32, le=512, description="Longest side of the stored thumbnail.")
    snapshot_every_changes: int = Field(1000, ge=1, description="Snapshot a shard after this many changes...")
    snapshot_interval_s: float = Field(10.0, gt=0, description="...or this long after its first unsnapshotted change.")
