"""A worker's read replica of every shard, kept current from the ``catalog.vectors`` changelog.

On start each shard comes from the newest snapshot the indexer wrote (then the changelog is
tailed from the offset recorded in it), or, without a usable snapshot, from PostgreSQL (then
the changelog is tailed from its beginning). Either way the replica converges: each product's
changes are ordered within its partition and applying one twice changes nothing. If the
broker lost its log (an offset is out of range), the shard is rebuilt from PostgreSQL.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import sqlalchemy as sa
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, OffsetOutOfRangeError
from pydantic import ValidationError

from schemas.events import VectorChange
from schemas.jobs import JobStore, ReplicaStatus
from schemas.settings import WorkerSettings
from workers import catalog, metrics, snapshots
from workers.shards import IndexPolicy, Shard, ShardSet

log = logging.getLogger(__name__)


def still_in_log(bootstrap: str, vectors_topic: str, snapshot: snapshots.Snapshot, timeout_s: float = 3.0) -> bool:
    """Whether the changelog record before the snapshot's offset is the one it recorded.

    False once the partition's high watermark shows the log ends before that record (a broker that
    lost its log: Tansu answers a fetch past the end with no records and no error, so waiting for
    one would take all of ``timeout_s``), and after ``timeout_s`` seconds without an answer.
    """
    if snapshot.offset <= 0:
        return False  # the changelog was empty: replay it all over Postgres instead
    tp = TopicPartition(vectors_topic, snapshot.partition)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="none")
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([tp])
        consumer.seek(tp, snapshot.offset - 1)
        while time.monotonic() < deadline:
            records = consumer.poll(timeout_ms=200).get(tp, [])
            if records:
                return records[0].offset == snapshot.offset - 1 and records[0].timestamp == snapshot.last_timestamp_ms
            highwater = consumer.highwater(tp)
            if highwater is not None and highwater < snapshot.offset:
                return False
        return False
    except KafkaError as exc:
        log.info("snapshot %s not usable (%s)", snapshot.path.name, exc)
        return False
    finally:
        consumer.close()


class Replica:
    """Shards for search, kept current by :meth:`start`; :attr:`shards` is safe to search meanwhile."""

    def __init__(self, settings: WorkerSettings, engine: sa.Engine, store: JobStore, dim: int) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.dim = dim
        self.policy = IndexPolicy.from_settings(settings)
        self.shards = ShardSet(settings.partitions, dim, self.policy, settings.model_threads())
        self.name = f"{socket.gethostname()}:{id(self):x}"
        self.start_offsets: dict[int, int] = {}
        self.lag: int | None = None  # changelog records not applied yet, all partitions (None: unknown)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._partition_lag = metrics.PartitionLag(metrics.REPLICA_LAG)
        self._live: set[int] = set()  # partitions caught up once: their changes count for freshness

    def _tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self.settings.vectors_topic, partition)

    def load(self) -> None:
        """Fill every shard from its newest valid snapshot, else from Postgres."""
        for partition in range(self.settings.partitions):
            snapshot = snapshots.newest(self.settings.snapshot_dir, self.settings.model_version, partition)
            if snapshot is not None and self._still_in_log(snapshot):
                self.shards.replace(partition, snapshot.load(self.policy))
                self.start_offsets[partition] = snapshot.offset
                source = f"snapshot {snapshot.path.name}"
            else:
                self.rebuild(partition)
                source = "postgres"
            log.info("replica shard %d: %d vectors from %s, changelog from offset %d", partition,
                     self.shards.shards[partition].ntotal, source, self.start_offsets[partition])

    def rebuild(self, partition: int) -> None:
        """Shard ``partition`` from Postgres; the changelog is then replayed from its beginning."""
        chunks = catalog.load_vectors(self.engine, self.settings.model_version, partition)
        self.shards.replace(partition, Shard.build(self.dim, chunks, self.policy))
        self.start_offsets[partition] = 0

    def _still_in_log(self, snapshot: snapshots.Snapshot) -> bool:
        return still_in_log(self.settings.kafka_bootstrap, self.settings.vectors_topic, snapshot)

    def start(self) -> None:
        """Load the shards, then tail the changelog in a daemon thread."""
        self.load()
        self._thread = threading.Thread(target=self._tail, name="replica", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def apply(self, partition: int, records: list) -> None:
        """Apply changelog records (ConsumerRecords, in offset order) to shard ``partition`` at once
        (:meth:`workers.shards.Shard.apply`); changes made by another model version are ignored, a
        malformed one is logged and skipped."""
        changes = []
        for record in records:
            try:
                change = VectorChange.model_validate_json(record.value)
                vector = change.array()
                if vector is not None and vector.shape != (self.dim,):
                    raise ValueError(f"a vector of {vector.shape[0]} dims, expected {self.dim}")
            except (ValidationError, ValueError) as exc:  # written by our own indexer: a bug
                log.error("skipping malformed changelog entry %s@%d: %s", self._tp(partition), record.offset, exc)
                continue
            if change.model_version == self.settings.model_version:
                changes.append((change.product_id, vector, change.source_timestamp_ms))
        self.shards.shards[partition].apply((product_id, vector) for product_id, vector, _ in changes)
        if partition in self._live:  # searchable from now
            now = time.time()
            for *_, source_ms in changes:
                if source_ms is not None:
                    metrics.REPLICA_FRESHNESS.observe(max(0.0, now - source_ms / 1000))

    def report(self) -> None:
        """Publish this replica's sizes and lag to the metrics and to Redis (for readiness)."""
        sizes = self.shards.sizes()
        for shard, size in enumerate(sizes):
            metrics.SHARD_VECTORS.labels(str(shard)).set(size)
        self.store.report_replica(ReplicaStatus(worker=self.name, model_version=self.settings.model_version,
                                                ntotal=sum(sizes), shard_sizes=sizes, lag=self.lag,
                                                updated_at=time.time()))

    def _tail(self) -> None:
        consumer = None
        last_report = 0.0
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = self._consumer()
                batches = consumer.poll(timeout_ms=self.settings.replica_poll_ms)
                for tp, records in batches.items():
                    self.apply(tp.partition, records)
                for tp in consumer.assignment():
                    highwater = consumer.highwater(tp)
                    if highwater is not None and consumer.position(tp) > highwater:
                        self._log_lost(consumer, tp)  # Tansu answers an empty fetch, not an error
                lags = self._partition_lag.update(consumer)
                self._live |= {p for p, lag in lags.items() if lag == 0}
                self.lag = sum(lags.values()) if len(lags) == self.settings.partitions else None
                if time.monotonic() - last_report >= self.settings.replica_status_interval_s:
                    self.report()
                    last_report = time.monotonic()
            except OffsetOutOfRangeError as exc:  # the broker lost the log (Apache Kafka says so)
                for tp in exc.args[0]:  # {TopicPartition: fetch offset}
                    self._log_lost(consumer, tp)
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

    def _log_lost(self, consumer: KafkaConsumer, tp: TopicPartition) -> None:
        """The changelog restarted below our position: Postgres is the truth, replay the new log."""
        log.warning("changelog %s is behind this replica (the broker lost its log): rebuilding shard %d "
                    "from postgres", tp, tp.partition)
        self.rebuild(tp.partition)
        consumer.seek(tp, 0)
        self._live.discard(tp.partition)

    def _consumer(self) -> KafkaConsumer:
        consumer = KafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, group_id=None,
                                 enable_auto_commit=False, auto_offset_reset="none",
                                 client_id=f"lookalike-replica-{self.name}")
        partitions = [self._tp(p) for p in range(self.settings.partitions)]
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, self.start_offsets.get(tp.partition, 0))
        self._live.clear()  # a new consumer catches up first: no freshness until then
        return consumer
