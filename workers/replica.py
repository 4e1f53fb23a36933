"""A worker's read replica of every shard: loaded from PostgreSQL, then kept current from
the ``catalog.vectors`` changelog (partition p feeds shard p), in a background thread.

Loading Postgres first and then replaying the changelog from its beginning converges:
each product's changes are ordered within its partition and applying one is idempotent,
so the replica ends at the newest state whatever the overlap.
"""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time

import numpy as np
import sqlalchemy as sa
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from pydantic import ValidationError

from schemas.events import VectorChange
from schemas.jobs import JobStore, ReplicaStatus
from schemas.settings import WorkerSettings
from workers import catalog, metrics
from workers.shards import ShardSet

log = logging.getLogger(__name__)


class Replica:
    """Shards for search, kept current by :meth:`start`; :attr:`shards` is safe to search meanwhile."""

    def __init__(self, settings: WorkerSettings, engine: sa.Engine, store: JobStore, dim: int) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.shards = ShardSet(settings.partitions, dim)
        self.name = f"{socket.gethostname()}:{id(self):x}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lag = metrics.PartitionLag(metrics.REPLICA_LAG)
        self._live: set[int] = set()  # partitions caught up once: their changes count for freshness

    def load(self) -> int:
        """Put every live vector of this model version from Postgres into its shard. Returns the count."""
        count = 0
        for shards, ids, vectors in catalog.load_vectors(self.engine, self.settings.model_version):
            for shard in np.unique(shards):
                mask = shards == shard
                self.shards.shards[int(shard)].upsert(ids[mask], vectors[mask])
            count += len(ids)
        log.info("replica loaded %d vectors from postgres: %s", count, self.shards.sizes())
        return count

    def start(self) -> None:
        """Load from Postgres, then tail the changelog in a daemon thread."""
        self.load()
        self._thread = threading.Thread(target=self._tail, name="replica", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def apply(self, partition: int, change: VectorChange) -> None:
        """Apply one changelog entry to shard ``partition`` (ignored if made by another model version)."""
        if change.model_version != self.settings.model_version:
            return
        shard = self.shards.shards[partition]
        ids = np.array([change.product_id], dtype=np.int64)
        if change.op == "delete":
            shard.remove(ids)
        else:
            vector = np.frombuffer(base64.b64decode(change.vector), dtype="<f4")[None, :]
            shard.upsert(ids, vector)

    def report(self) -> None:
        sizes = self.shards.sizes()
        for shard, size in enumerate(sizes):
            metrics.SHARD_VECTORS.labels(str(shard)).set(size)
        self.store.report_replica(ReplicaStatus(worker=self.name, model_version=self.settings.model_version,
                                                ntotal=sum(sizes), shard_sizes=sizes, updated_at=time.time()))

    def _tail(self) -> None:
        consumer = None
        last_report = 0.0
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = self._consumer()
                for tp, records in consumer.poll(timeout_ms=self.settings.replica_poll_ms).items():
                    for record in records:
                        try:
                            change = VectorChange.model_validate_json(record.value)
                            self.apply(tp.partition, change)
                            if tp.partition in self._live and change.source_timestamp_ms is not None:
                                metrics.REPLICA_FRESHNESS.observe(
                                    max(0.0, time.time() - change.source_timestamp_ms / 1000))
                        except (ValidationError, ValueError) as exc:  # written by our own indexer: a bug
                            log.error("skipping malformed changelog entry %s@%d: %s", tp, record.offset, exc)
                self._live |= {p for p, lag in self.lag.update(consumer).items() if lag == 0}
                if time.monotonic() - last_report >= self.settings.replica_status_interval_s:
                    self.report()
                    last_report = time.monotonic()
            except KafkaError as exc:
                log.warning("changelog unavailable, retrying: %s", exc)
                if consumer is not None:
                    consumer.close()
                consumer = None
                self._stop.wait(1.0)
            except Exception:  # keep the replica thread alive whatever happens; say so loudly
                log.exception("replica loop error")
                self._stop.wait(1.0)
        if consumer is not None:
            consumer.close()

    def _consumer(self) -> KafkaConsumer:
        consumer = KafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, group_id=None,
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 client_id=f"lookalike-replica-{self.name}")
        partitions = [TopicPartition(self.settings.vectors_topic, p) for p in range(self.settings.partitions)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        self._live.clear()  # a new consumer replays from the beginning: catch-up again
        return consumer
