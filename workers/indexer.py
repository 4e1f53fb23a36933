"""The indexer: a Kafka consumer group on ``catalog.products`` that makes products searchable.

For each micro-batch of one partition: validate events (invalid ones go to the
dead-letter topic with the reason), skip versions not newer than the stored one,
decode and embed the new images, write products and vectors to PostgreSQL in one
transaction, publish the vector changes to ``catalog.vectors`` (same partition =
shard), and only then commit ``offset + 1``. Delivery is at-least-once and every
write is idempotent by product id and version, so a replay changes nothing.
"""

from __future__ import annotations

import base64
import io
import logging
import signal
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from PIL import Image
from pydantic import ValidationError

from schemas.events import CatalogEvent, DeadLetter, VectorChange
from schemas.settings import IndexerSettings
from workers import catalog, metrics, snapshots
from workers.decode import decode_reduced
from workers.embed import DECODE_MIN_PX, Embedder
from workers.segment import Segmenter
from workers.errors import FetchError, ImageRejected, InvalidEvent, InvalidInput
from workers.fetch import Fetcher
from workers.replica import still_in_log
from workers.shards import IndexPolicy, Shard
from workers import topics

log = logging.getLogger(__name__)

TRANSIENT = (sa.exc.OperationalError, sa.exc.InterfaceError, KafkaError)


@dataclass
class Outcome:
    """What one micro-batch did: changes applied, stale events ignored, dead letters sent, and
    events already applied before (same version) whose vector change was published again."""

    applied: int = 0
    stale: int = 0
    dead: int = 0
    replayed: int = 0

    def add(self, other: Outcome) -> None:
        self.applied += other.applied
        self.stale += other.stale
        self.dead += other.dead
        self.replayed += other.replayed


def next_offsets(tp: TopicPartition, records: list[ConsumerRecord]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The commit for a processed batch: the offset after its last record."""
    return {tp: OffsetAndMetadata(records[-1].offset + 1, "", -1)}


class OwnedShard:
    """A shard this indexer writes, with the changelog position it reflects."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.next_offset: int | None = None  # of catalog.vectors: the first change not in the shard
        self.last_timestamp_ms = -1  # of the change at next_offset - 1
        self.changes = 0  # since the last snapshot
        self.first_change_at = 0.0
        self.snapshot_offset: int | None = None  # the snapshot it was taken over from, if any

    def apply(self, changes: list[VectorChange], receipts: list) -> None:
        """Apply published changes; ``receipts`` are their RecordMetadata or ConsumerRecords
        (offset, timestamp), possibly more than ``changes`` (another model version's changes)."""
        self.shard.apply((change.product_id, change.array()) for change in changes)
        if receipts:
            if self.changes == 0:
                self.first_change_at = time.monotonic()
            self.changes += len(receipts)
            last = max(receipts, key=lambda r: r.offset)
            self.next_offset, self.last_timestamp_ms = last.offset + 1, last.timestamp


class Indexer:
    """Applies catalog events of one partition at a time. Kafka clients and engine are injected."""

    def __init__(self, settings: IndexerSettings, engine: sa.Engine, producer: KafkaProducer,
                 embedder: Embedder, fetcher: Fetcher | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.producer = producer
        self.embedder = embedder
        self.segmenter = Segmenter(embedder.device) if settings.segment else None
        self.fetcher = fetcher or Fetcher(settings)
        self.roots = [root.resolve() for root in settings.image_roots]
        self.lag = metrics.PartitionLag(metrics.INDEXER_LAG)
        self.shards: dict[int, OwnedShard] = {}  # the partitions this indexer owns now
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")  # of shards given up
        self.writing: dict[int, Future] = {}  # partition -> its snapshot being written by ``writer``

    def build(self, partition: int) -> OwnedShard:
        """Shard ``partition`` for an indexer taking it over (at start, or from one that stopped or
        left the group): from its newest snapshot plus the changelog after it, else from Postgres.

        Raises:
            sqlalchemy.exc.OperationalError: Postgres unavailable (transient).
            OSError: the snapshot this indexer wrote when it gave the shard up could not be written.
        """
        writing = self.writing.pop(partition, None)
        if writing is not None:
            writing.result()  # this indexer gave the shard up just before: its snapshot is the newest
        policy = IndexPolicy.from_settings(self.settings)
        owned = self.takeover(partition, policy)
        if owned is not None:
            return owned
        chunks = catalog.load_vectors(self.engine, self.embedder.model_version, partition)
        return OwnedShard(Shard.build(self.embedder.dim, chunks, policy))

    def own(self, partition: int, owned: OwnedShard) -> None:
        """Keep ``owned`` as shard ``partition`` from now on."""
        self.shards[partition] = owned
        metrics.INDEXER_SHARD_VECTORS.labels(str(partition)).set(owned.shard.ntotal)
        source = "postgres" if owned.snapshot_offset is None else \
            f"snapshot at offset {owned.snapshot_offset} + changelog to {owned.next_offset}"
        log.info("own shard %d: %d vectors from %s", partition, owned.shard.ntotal, source)

    def takeover(self, partition: int, policy: IndexPolicy) -> OwnedShard | None:
        """Shard ``partition`` from its newest snapshot, then every change of ``catalog.vectors``
        after it up to the high watermark; None if there is no usable snapshot or the changelog
        cannot be read to its end within ``TAKEOVER_TIMEOUT_S``.

        Complete: the previous owner published every change it wrote before committing its input,
        and an input it wrote to Postgres but did not commit is replayed to this owner, which
        publishes the stored state again (``Outcome.replayed``).
        """
        settings, model_version = self.settings, self.embedder.model_version
        snapshot = snapshots.newest(settings.snapshot_dir, model_version, partition)
        if snapshot is None or not still_in_log(settings.kafka_bootstrap, settings.vectors_topic, snapshot):
            return None
        owned = OwnedShard(snapshot.load(policy))
        owned.snapshot_offset = owned.next_offset = snapshot.offset
        owned.last_timestamp_ms = snapshot.last_timestamp_ms
        tp = TopicPartition(settings.vectors_topic, partition)
        consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                                 auto_offset_reset="none", client_id="lookalike-indexer-takeover")
        deadline = time.monotonic() + TAKEOVER_TIMEOUT_S
        try:
            consumer.assign([tp])
            consumer.seek(tp, snapshot.offset)
            while True:
                records = consumer.poll(timeout_ms=200).get(tp, [])
                changes = [VectorChange.model_validate_json(r.value) for r in records]
                owned.apply([c for c in changes if c.model_version == model_version], records)
                highwater = consumer.highwater(tp)
                if highwater is not None and consumer.position(tp) >= highwater and not records:
                    return owned
                if time.monotonic() > deadline:
                    log.warning("shard %d: changelog not read to its end in %.0f s", partition, TAKEOVER_TIMEOUT_S)
                    return None
        except (KafkaError, ValidationError) as exc:
            log.warning("shard %d: cannot replay the changelog after the snapshot (%s)", partition, exc)
            return None
        finally:
            consumer.close()

    def revoke(self, partitions: list[int]) -> None:
        """Give shards up (rebalance or shutdown); what changed since their last snapshot is written
        by :attr:`writer`, not here: kafka-python calls this on the thread that sends heartbeats, and
        a snapshot of 11,000 vectors (1280-d) takes about 0.26 s (4 shards of 50,000: 4.1 s, against
        a 6 s session timeout). :meth:`build` and :meth:`close` wait for those snapshots; another
        indexer that takes a shard over before its snapshot is written starts from the one before
        and replays more of the changelog."""
        for partition in partitions:
            owned = self.shards.pop(partition, None)
            if owned is not None:
                self.writing[partition] = self.writer.submit(self.snapshot, partition, owned, force=True)
                metrics.INDEXER_SHARD_VECTORS.remove(str(partition))
                log.info("gave up shard %d", partition)

    def close(self) -> None:
        """Wait for the snapshots of the shards given up, then release the image fetcher.

        Raises:
            OSError: a snapshot could not be written.
        """
        try:
            for writing in self.writing.values():
                writing.result()
        finally:
            self.writer.shutdown()
            self.fetcher.close()

    def snapshot(self, partition: int, owned: OwnedShard | None = None,
                 force: bool = False) -> snapshots.Snapshot | None:
        """Write shard ``partition`` (the one owned now, or ``owned``) if it changed
        ``snapshot_every_changes`` times or ``snapshot_interval_s`` ago (or at all, with ``force``)
        and snapshots are configured."""
        owned = owned or self.shards.get(partition)
        directory = self.settings.snapshot_dir
        if directory is None or owned is None or owned.next_offset is None or owned.changes == 0:
            return None
        due = owned.changes >= self.settings.snapshot_every_changes or \
            time.monotonic() - owned.first_change_at >= self.settings.snapshot_interval_s
        if not (force or due):
            return None
        written = snapshots.write(directory, self.embedder.model_version, partition, owned.shard,
                                  owned.next_offset, owned.last_timestamp_ms)
        owned.changes = 0
        metrics.SNAPSHOT_WRITTEN.labels(str(partition)).set(written.written_ms / 1000)
        return written

    def process(self, tp: TopicPartition, records: list[ConsumerRecord]) -> Outcome:
        """Make one partition's batch durable: Postgres, changelog and dead letters written and flushed.

        Raises:
            sqlalchemy.exc.OperationalError, kafka.errors.KafkaError: transient; nothing is committed,
                and replaying the batch is harmless.
        """
        outcome = Outcome()
        latest: dict[int, tuple[CatalogEvent, ConsumerRecord]] = {}  # the newest event of each product
        futures = []
        for record in records:
            try:
                event = self.parse(record)
            except InvalidInput as exc:
                futures.append(self.dead_letter(record, exc.message))
                outcome.dead += 1
                continue
            held = latest.get(event.product_id)
            if held is not None:
                outcome.stale += 1
            if held is None or event.version >= held[0].version:
                latest[event.product_id] = (event, record)

        with self.engine.connect() as conn:
            stored = catalog.stored_versions(conn, latest)
        fresh = [(e, r) for e, r in latest.values() if e.version > stored.get(e.product_id, -1)]
        # The same version again: a replay after a crash may have written Postgres but not the
        # changelog, so the stored state's change is published again (harmless for replicas).
        replayed = [e.product_id for e, _ in latest.values() if e.version == stored.get(e.product_id)]
        outcome.stale += len(latest) - len(fresh) - len(replayed)

        images = []
        fetched = self.fetch_urls([e for e, _ in fresh if e.op == "upsert" and e.image.url is not None])
        for event, record in fresh:
            if event.op != "upsert":
                continue
            try:
                data = fetched[event.product_id] if event.image.url is not None else self.image_bytes(event)
                if isinstance(data, InvalidInput):
                    raise data
                decoded = decode_reduced(data, self.settings.max_pixels, max(DECODE_MIN_PX, self.settings.thumbnail_px),
                                         self.settings.max_image_bytes)
                images.append((event, decoded.pixels))
            except InvalidInput as exc:
                futures.append(self.dead_letter(record, exc.message))
                outcome.dead += 1
            except Exception as exc:  # noqa: BLE001 - a file that breaks the decoder would break every replay too
                log.exception("product %d: the decoder failed on its image", event.product_id)
                futures.append(self.dead_letter(record, f"the image could not be decoded ({type(exc).__name__}: "
                                                        f"{exc}); re-export it as JPEG or PNG"))
                outcome.dead += 1
        pixels = [p for _, p in images]
        if self.segmenter is not None:  # as the worker does for queries (workers.tasks.Runtime.query)
            pixels = [p for p, _ in self.segmenter.crop_all(pixels)]
        vectors = self.embedder.embed(pixels)
        upserts = [catalog.Upsert(event, tp.partition, vector, thumbnail(pixels, self.settings.thumbnail_px))
                   for (event, pixels), vector in zip(images, vectors)]
        deletes = [e for e, _ in fresh if e.op == "delete"]

        model_version = self.embedder.model_version
        with self.engine.begin() as conn:
            written = set(catalog.write_upserts(conn, upserts, model_version))
            removed = set(catalog.write_deletes(conn, deletes))
            again = catalog.current_state(conn, replayed, model_version) if replayed else []
        outcome.stale += len(upserts) - len(written) + len(deletes) - len(removed)
        outcome.applied = len(written) + len(removed)

        stamp = {product_id: source_timestamp_ms(record) for product_id, (_, record) in latest.items()}
        changes = [VectorChange.of(u.event.product_id, u.event.version, model_version, u.vector,
                                   stamp[u.event.product_id]) for u in upserts if u.event.product_id in written]
        changes += [VectorChange.of(e.product_id, e.version, model_version, None, stamp[e.product_id])
                    for e in deletes if e.product_id in removed]
        changes += [VectorChange.of(i, version, model_version, None if deleted else vector, stamp[i])
                    for i, version, deleted, vector in again if deleted or vector is not None]
        outcome.replayed = len(again)
        sent = [self.publish_change(tp.partition, change) for change in changes]
        self.producer.flush()
        for future in futures:
            future.get(timeout=30)  # raises KafkaError if a send failed: the batch is then retried
        receipts = [future.get(timeout=30) for future in sent]
        owned = self.shards.get(tp.partition)
        if owned is not None:
            owned.apply(changes, receipts)
            metrics.INDEXER_SHARD_VECTORS.labels(str(tp.partition)).set(owned.shard.ntotal)
        return outcome

    def parse(self, record: ConsumerRecord) -> CatalogEvent:
        """Validate one message.

        Raises:
            InvalidEvent: not JSON, or not a valid catalog event; or the key is not the product id.
        """
        try:
            event = CatalogEvent.model_validate_json(record.value or b"")
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
            raise InvalidEvent(f"not a valid catalog event: {problems}") from None
        if record.key is not None and record.key != event.key():
            raise InvalidEvent(f"message key {record.key!r} is not the product id {event.product_id}")
        return event

    def fetch_urls(self, events: list[CatalogEvent]) -> dict[int, bytes | FetchError]:
        """The images of ``events`` given by ``image.url``, fetched ``fetch_concurrency`` at a time
        through the SSRF guard of :mod:`workers.fetch`.

        Returns:
            Per product id, the bytes or the :class:`FetchError` (the event is then dead-lettered
            with it: the host may answer later, and the dead letter keeps the event to replay).
        """
        if not events:
            return {}

        def fetch(event: CatalogEvent) -> bytes | FetchError:
            try:
                return self.fetcher.fetch(event.image.url)
            except FetchError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=min(self.settings.fetch_concurrency, len(events))) as pool:
            return dict(zip([e.product_id for e in events], pool.map(fetch, events)))

    def image_bytes(self, event: CatalogEvent) -> bytes:
        """The bytes of an upsert's image given by ``data`` or ``path`` (``url``: :meth:`fetch_urls`).

        Raises:
            ImageRejected: the path is outside LOOKALIKE_IMAGE_ROOTS or unreadable, or the data is not
                base64.
        """
        image = event.image
        if image.data is not None:
            try:
                return image.decoded()
            except ValueError as exc:
                raise ImageRejected(str(exc), "bad_base64") from None
        if image.path is not None:
            path = Path(image.path).resolve()
            if not any(path.is_relative_to(root) for root in self.roots):
                raise ImageRejected(f"image.path {image.path} is outside the allowed roots "
                                    f"{[str(r) for r in self.roots]} (LOOKALIKE_IMAGE_ROOTS)", "path_refused")
            try:
                info = path.stat()  # before reading: a FIFO would block the partition, a huge file fill the memory
                if not stat.S_ISREG(info.st_mode):
                    raise ImageRejected(f"image.path {image.path} is not a regular file; point it at the photo's file",
                                        "unreadable")
                if info.st_size > self.settings.max_image_bytes:
                    raise ImageRejected(f"image.path {image.path} is {info.st_size} bytes, more than the "
                                        f"{self.settings.max_image_bytes}-byte limit (LOOKALIKE_MAX_IMAGE_BYTES); "
                                        "send a smaller file", "too_large")
                return path.read_bytes()
            except OSError as exc:
                raise ImageRejected(f"image.path {image.path} cannot be read: {exc.strerror}", "unreadable") from None
        raise ImageRejected("the image has neither data nor path; URLs are fetched by fetch_urls", "no_image")

    def dead_letter(self, record: ConsumerRecord, reason: str):
        log.warning("dead letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        letter = DeadLetter(reason=reason, topic=record.topic, partition=record.partition, offset=record.offset,
                            key=record.key.decode(errors="replace") if record.key else None,
                            payload=base64.b64encode(record.value or b"").decode())
        return self.producer.send(self.settings.dlq_topic, key=record.key, value=letter.model_dump_json().encode())

    def publish_change(self, partition: int, change: VectorChange):
        return self.producer.send(self.settings.vectors_topic, key=str(change.product_id).encode(),
                                  value=change.model_dump_json().encode(), partition=partition)


def source_timestamp_ms(record: ConsumerRecord) -> int | None:
    """The catalog record's Kafka timestamp (ms since the epoch), or None when it has none."""
    return record.timestamp if record.timestamp is not None and record.timestamp >= 0 else None


def thumbnail(pixels: np.ndarray, max_px: int) -> bytes:
    """A JPEG of at most ``max_px`` on the longest side, from uint8 (H, W, 3) RGB."""
    image = Image.fromarray(pixels)
    image.thumbnail((max_px, max_px))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


TAKEOVER_TIMEOUT_S = 30.0  # longest replay of a taken-over shard's changelog before rebuilding from Postgres
RECREATED_WATCH_S = 120.0  # how long after recreating the topics an indexer with no partitions rejoins
REJOIN_AFTER_SESSIONS = 3  # session timeouts an indexer owns no shard before it rejoins (see TopicWatch)


class _Ownership(ConsumerRebalanceListener):
    """Partitions assigned by the group become shards the indexer owns (and revoked ones, not).

    kafka-python calls these methods on its I/O thread, the one that sends heartbeats, so they must
    return well within a session timeout, and building a shard can take seconds (a snapshot and its
    changelog, or a shard's vectors from Postgres): built here, four took 12 s after a broker
    restart, past the 6 s session timeout, and the member consumed nothing after (seen in CI at
    a7361cd, when each takeover still waited 3 s for a changelog record the broker had lost). So
    an assignment is only noted here and the poll loop builds the shards (:meth:`build`). Records
    of a partition polled before its shard is built are still written and published; the shard,
    built afterwards from Postgres or the changelog, holds them. For the same reason a revoked
    shard's snapshot is written by another thread (:meth:`Indexer.revoke`).

    They run while the poll loop waits in the consumer's ``poll`` or ``close`` (kafka-python
    3.0.12 invokes listeners only from a join or a close), so never beside :meth:`Indexer.process`
    or :meth:`build`. :meth:`build` still keeps a shard only if its partition was not revoked or
    assigned again while it was built, so that a client that called them from elsewhere could not
    make it own a shard it no longer has.
    """

    def __init__(self, indexer: Indexer) -> None:
        self.indexer = indexer
        self.lock = threading.Lock()
        self.pending: dict[int, int] = {}  # partition -> generation of the assignment, not built yet
        self.generation = 0

    def on_partitions_revoked(self, revoked) -> None:
        partitions = [tp.partition for tp in revoked]
        with self.lock:
            for partition in partitions:
                self.pending.pop(partition, None)
        self.indexer.revoke(partitions)

    def on_partitions_assigned(self, assigned) -> None:
        with self.lock:
            self.generation += 1
            self.pending.update({tp.partition: self.generation for tp in assigned})

    def build(self) -> None:
        """Build the shards assigned and not built yet (called from the poll loop); one that hits a
        transient error stays pending and is tried again on the next call."""
        with self.lock:
            todo = sorted(self.pending.items())
        for partition, generation in todo:
            try:
                owned = self.indexer.build(partition)
            except TRANSIENT as exc:
                log.warning("cannot build shard %d yet, will retry: %s", partition, exc)
                return
            with self.lock:
                if self.pending.get(partition) == generation:  # else revoked (or assigned again) meanwhile
                    del self.pending[partition]
                    self.indexer.own(partition, owned)


def consumer_for(settings: IndexerSettings, listener: ConsumerRebalanceListener | None = None) -> KafkaConsumer:
    """The group consumer; with an ``_Ownership`` listener, assignments and revocations move its shards."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=settings.group_id, client_id="lookalike-indexer",
        enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=settings.batch_size,
        session_timeout_ms=settings.session_timeout_ms, heartbeat_interval_ms=settings.heartbeat_interval_ms)
    consumer.subscribe([settings.products_topic], listener=listener)
    return consumer


def step(indexer: Indexer, consumer: KafkaConsumer) -> Outcome | None:
    """Poll one micro-batch and make each partition's part durable, then commit past it.

    A transient failure (Postgres or Kafka unavailable) commits nothing for that partition and
    rewinds it to the batch's first offset, so the next poll retries the same events.

    Returns:
        The summed outcome, or None when a partition hit a transient error.
    """
    settings = indexer.settings
    total, failed = Outcome(), False
    for tp, records in consumer.poll(timeout_ms=settings.poll_timeout_ms, max_records=settings.batch_size).items():
        start = time.perf_counter()
        try:
            outcome = indexer.process(tp, records)
            consumer.commit(next_offsets(tp, records))
        except TRANSIENT as exc:
            log.warning("transient error on %s, will retry the batch: %s", tp, exc)
            metrics.INDEXER_RETRIES.inc()
            consumer.seek(tp, records[0].offset)
            failed = True
            continue
        metrics.EVENTS.labels("applied").inc(outcome.applied)
        metrics.EVENTS.labels("stale").inc(outcome.stale)
        metrics.EVENTS.labels("dead_letter").inc(outcome.dead)
        metrics.EVENTS.labels("replayed").inc(outcome.replayed)
        metrics.INDEXER_BATCH_SECONDS.observe(time.perf_counter() - start)
        metrics.INDEXER_BATCH_EVENTS.observe(len(records))
        log.info("%s@%d: %d records, %d applied, %d stale, %d dead letters, %d replayed, %.2f s",
                 tp.partition, records[0].offset, len(records), outcome.applied, outcome.stale, outcome.dead,
                 outcome.replayed, time.perf_counter() - start)
        total.add(outcome)
    for partition in list(indexer.shards):
        indexer.snapshot(partition)
    indexer.lag.update(consumer)
    return None if failed else total


class TopicWatch:
    """Recreates the catalog topics when the broker lost them (a memory broker restarted): the
    group then starts over on the empty log, and shards come back from Postgres on reassignment.

    A member can be left owning no shard when the group should give it some; it then leaves and
    rejoins the group, once it has owned none for ``REJOIN_AFTER_SESSIONS`` session timeouts (a
    healthy rebalance is over well before that; one whose shards are being built is not cut):

    - a rebalance that revoked its partitions and never finished (the consumer still lists them):
      kafka-python 3.0.12 drops the result of a join that completes after the topic's metadata has
      come back to what it was when the join began, so the shards revoked stay revoked (seen with
      Tansu after a restart, when the topic was missing for a moment);
    - for ``RECREATED_WATCH_S`` after recreating the topics, a sync that handed it nothing (seen
      with Tansu: no later metadata change triggers another rebalance).
    """

    def __init__(self, consumer: KafkaConsumer, settings: IndexerSettings, listener: _Ownership) -> None:
        self.consumer, self.settings, self.listener = consumer, settings, listener
        self.checked_at = 0.0
        self.recreated_at: float | None = None
        self.idle_since: float | None = None  # since when the indexer has owned no shard

    def check(self) -> None:
        """At most every ``topic_check_interval_s``: recreate missing topics, rejoin if left without shards."""
        now = time.monotonic()
        if now - self.checked_at < self.settings.topic_check_interval_s:
            return
        self.checked_at = now
        try:
            if self.settings.products_topic not in self.consumer.topics():
                log.warning("topic %s is missing: creating the catalog topics", self.settings.products_topic)
                topics.create_topics(self.settings)
                self.recreated_at = now
        except KafkaError as exc:
            log.warning("cannot check topics: %s", exc)
            return
        if self.listener.indexer.shards or self.listener.pending:
            self.idle_since = None
            return
        self.idle_since = self.idle_since or now
        if now - self.idle_since < REJOIN_AFTER_SESSIONS * self.settings.session_timeout_ms / 1000:
            return
        if self.consumer.assignment():
            reason = "a rebalance revoked its partitions and has not assigned any"
        elif self.recreated_at is not None and now - self.recreated_at < RECREATED_WATCH_S:
            reason = "no partitions assigned since the topics were recreated"
        else:
            return  # more indexers than partitions: owning none is right
        log.warning("%s for %.0f s: rejoining the group", reason, now - self.idle_since)
        self.consumer.unsubscribe()
        self.consumer.subscribe([self.settings.products_topic], listener=self.listener)
        self.idle_since = now


def run(settings: IndexerSettings, stop: list[bool]) -> None:
    """Consume until ``stop[0]`` is set, backing off (0.5 s doubling to 10 s) after transient errors."""
    engine = sa.create_engine(settings.database_url, pool_pre_ping=True)
    producer = topics.producer(settings.kafka_bootstrap)
    indexer = Indexer(settings, engine, producer, Embedder.from_settings(settings))
    indexer.embedder.load()
    listener = _Ownership(indexer)
    consumer = consumer_for(settings, listener)
    watch = TopicWatch(consumer, settings, listener)
    backoff_s = 0.5
    try:
        while not stop[0]:
            listener.build()
            watch.check()
            if step(indexer, consumer) is None:
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 10.0)
            else:
                backoff_s = 0.5
    finally:
        indexer.revoke(list(indexer.shards))
        indexer.close()  # the snapshots written before the group hands the shards to others
        consumer.close()
        producer.close()
        engine.dispose()


def main() -> None:
    """Entry point of the ``indexer`` process (Procfile)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = IndexerSettings()
    metrics.serve(settings.metrics_host, settings.metrics_port)
    stop = [False]

    def _stop(signum, frame):
        log.info("signal %d: finishing the current batch, then stopping", signum)
        stop[0] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    run(settings, stop)


if __name__ == "__main__":
    main()
