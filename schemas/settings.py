"""Settings, one class per process kind, read from ``LOOKALIKE_*`` environment variables.

Build them in an entry point (app factory, worker init, indexer ``main()``),
never at import time, so a test or a launcher can set the environment first.

Hierarchy::

    Settings                 shared: where Postgres, Redis and Kafka are; topic names
    ├── GatewaySettings      HTTP limits
    └── ModelSettings        the embedding model and where it runs; the metrics port
        ├── WorkerSettings   replicas of the shards
        └── IndexerSettings  consumer group, batching, image sources
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
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
    snapshot_dir: Path | None = Field(None, description=(
        "Where the indexer writes shard snapshots and workers read them (a shared volume); "
        "unset: no snapshots, workers build their replicas from PostgreSQL."))


class GatewaySettings(Settings):
    """The HTTP gateway."""

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest accepted upload.")
    default_k: int = Field(10, ge=1, le=100)


class ModelSettings(Settings):
    """The embedding model; the worker and the indexer must agree on ``model_version``.

    Also where the process serves ``/metrics``: workers and indexers are not HTTP servers,
    so each runs a small one of its own on ``metrics_host:metrics_port``.
    """

    model_version: str = "effnet-lite0-imagenet-gap-v1"
    device: str = Field("auto", description="`auto` (CUDA when present), `cpu` or `cuda[:N]`.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch's default.")
    embed_batch: int = Field(8, ge=1, le=1024, description=(
        "Most images in one forward pass: lower it on out-of-memory errors; on 2 CPU cores "
        "Lite0 runs 40-44 img/s at 1-8 and 20 img/s at 32, on a GPU larger is faster."))
    metrics_host: str = Field("127.0.0.1", description="Address of this process's /metrics; 0.0.0.0 in a container.")
    metrics_port: int = Field(0, ge=0, le=65535, description=(
        "Port of this process's /metrics; 0 picks a free one and logs it. The Procfile passes honcho's "
        "$PORT, so several workers or indexers on one host never collide."))


class WorkerSettings(ModelSettings):
    """A Celery vision worker: the model and its replicas of the shards."""

    replica_poll_ms: int = Field(200, ge=10, description="Longest wait of one changelog poll.")
    replica_status_interval_s: float = Field(1.0, gt=0, description="How often a worker reports its replicas to Redis.")


class IndexerSettings(ModelSettings):
    """The Kafka indexer (consumer group on the products topic)."""

    group_id: str = "indexer"
    batch_size: int = Field(32, ge=1, le=1024, description="Most events embedded and written in one micro-batch.")
    poll_timeout_ms: int = Field(100, ge=1, description="Longest wait for one micro-batch to fill.")
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    image_roots: list[Path] = Field(
        default_factory=list,
        description="Directories an event's `image.path` may point into; empty refuses every path.",
    )
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest image in an event.")
    thumbnail_px: int = Field(160, ge=32, le=512, description="Longest side of the stored thumbnail.")
    snapshot_every_changes: int = Field(1000, ge=1, description="Snapshot a shard after this many changes...")
    snapshot_interval_s: float = Field(10.0, gt=0, description="...or this long after its first unsnapshotted change.")
