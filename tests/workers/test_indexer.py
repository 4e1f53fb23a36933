"""The indexer against real PostgreSQL and a real Kafka-protocol broker."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid

import pytest
import sqlalchemy as sa
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import REGISTRY

from ops import dlq
from ops.publish import publish, read_catalog
from workers.topics import create_topics
from schemas.events import CatalogEvent, DeadLetter, ImageRef, VectorChange
from schemas.settings import IndexerSettings
from schemas.tables import product_vectors, products
from tests.conftest import SAMPLE, serve_photos
from tests.workers.test_decode import avif_broken
from workers import snapshots, topics
from workers.decode import decode_reduced
from workers.errors import ImageRejected
from workers.indexer import Indexer, Outcome, consumer_for, step


@pytest.fixture
def isettings(settings) -> IndexerSettings:
    """Indexer settings on topics and a consumer group of this test's own."""
    name = uuid.uuid4().hex[:8]
    isettings = IndexerSettings(**{**settings.model_dump(), "products_topic": f"{name}.products",
                                   "vectors_topic": f"{name}.vectors", "dlq_topic": f"{name}.dlq",
                                   "group_id": f"indexer-{name}", "model_version": "test-model"})
    create_topics(isettings)
    return isettings


@pytest.fixture
def kafka_clients(isettings):
    consumer, producer = consumer_for(isettings), topics.producer(isettings.kafka_bootstrap)
    yield consumer, producer
    consumer.close()
    producer.close()


ID_OFFSET = 9_000_000  # product ids of these tests' own, apart from the end-to-end test's


@pytest.fixture(scope="module")
def sample_events() -> list[CatalogEvent]:
    events, errors = read_catalog(SAMPLE / "products.csv", SAMPLE / "images", version=1)
    assert not errors
    return [e.model_copy(update={"product_id": e.product_id + ID_OFFSET}) for e in events]


def run_until(indexer: Indexer, consumer: KafkaConsumer, done, timeout_s: float = 60) -> Outcome:
    """Step the indexer until ``done(total)``; the consumer group join takes a few seconds on Tansu."""
    total = Outcome()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        outcome = step(indexer, consumer)
        if outcome is not None:
            total.add(outcome)
        if done(total):
            return total
    raise AssertionError(f"indexer did not finish in {timeout_s} s: {total}")


def read_all(settings, topic: str, partitions: int) -> list:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=2000)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    records = list(consumer)
    consumer.close()
    return records


def committed(consumer: KafkaConsumer, settings) -> dict[int, int | None]:
    return {p: consumer.committed(TopicPartition(settings.products_topic, p)) for p in range(settings.partitions)}


def test_commits_only_after_products_and_vectors_are_written(isettings, kafka_clients, engine, embedder,
                                                              sample_events):
    consumer, producer = kafka_clients
    events = sample_events[:12]
    ids = [e.product_id for e in events]
    publish(isettings.kafka_bootstrap, isettings.products_topic, events)

    broken = sa.create_engine("postgresql+psycopg2://postgres@127.0.0.1:1/nowhere")
    failing = Indexer(isettings, broken, producer, embedder)
    deadline = time.monotonic() + 30
    while step(failing, consumer) is not None:  # None: records came and the batch failed
        assert time.monotonic() < deadline, "no records reached the consumer"
    assert committed(consumer, isettings) == {p: None for p in range(isettings.partitions)}
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(products.c.id.in_(ids))).scalar_one() == 0

    indexer = Indexer(isettings, engine, producer, embedder)
    total = run_until(indexer, consumer, lambda t: t.applied == len(events))
    assert (total.stale, total.dead) == (0, 0)

    with engine.connect() as conn:
        rows = conn.execute(sa.select(product_vectors.c.product_id, product_vectors.c.dim)
                            .where(product_vectors.c.product_id.in_(ids))).all()
    assert sorted(r.product_id for r in rows) == sorted(ids) and {r.dim for r in rows} == {1280}
    highwater = {tp.partition: consumer.highwater(tp) for tp in consumer.assignment()}
    assert committed(consumer, isettings) == {p: highwater.get(p) or None for p in range(isettings.partitions)}
    changes = [VectorChange.model_validate_json(r.value) for r in read_all(isettings, isettings.vectors_topic, 4)]
    assert sorted(c.product_id for c in changes) == sorted(ids)


def test_republishing_the_same_version_changes_nothing(isettings, kafka_clients, engine, embedder,
                                                       sample_events):
    consumer, producer = kafka_clients
    events = sample_events[12:20]
    ids = [e.product_id for e in events]
    indexer = Indexer(isettings, engine, producer, embedder)
    publish(isettings.kafka_bootstrap, isettings.products_topic, events)
    run_until(indexer, consumer, lambda t: t.applied == len(events))
    with engine.connect() as conn:
        before = conn.execute(sa.select(products.c.id, products.c.updated_at).where(products.c.id.in_(ids))).all()

    publish(isettings.kafka_bootstrap, isettings.products_topic, events)
    total = run_until(indexer, consumer, lambda t: t.replayed == len(events))
    assert (total.applied, total.stale) == (0, 0)
    with engine.connect() as conn:
        after = conn.execute(sa.select(products.c.id, products.c.updated_at).where(products.c.id.in_(ids))).all()
    assert sorted(after) == sorted(before)
    # The stored state's changes are published again (a crash may have lost them): the same ones.
    changes = [VectorChange.model_validate_json(r.value).model_copy(update={"source_timestamp_ms": None})
               for r in read_all(isettings, isettings.vectors_topic, 4)]
    first, again = {}, {}
    for change in changes:
        (again if change.product_id in first else first)[change.product_id] = change
    assert again == first and len(changes) == 2 * len(events)


def test_an_older_version_changes_nothing_and_is_counted_stale(isettings, kafka_clients, engine, embedder,
                                                              sample_events):
    consumer, producer = kafka_clients
    event = sample_events[23].model_copy(update={"version": 5})
    indexer = Indexer(isettings, engine, producer, embedder)
    publish(isettings.kafka_bootstrap, isettings.products_topic, [event])
    run_until(indexer, consumer, lambda t: t.applied == 1)
    older = event.model_copy(update={"version": 4, "title": "Older"})
    publish(isettings.kafka_bootstrap, isettings.products_topic, [older])
    total = run_until(indexer, consumer, lambda t: t.stale == 1)
    assert (total.applied, total.replayed) == (0, 0)
    with engine.connect() as conn:
        assert conn.execute(sa.select(products.c.title).where(products.c.id == event.product_id)).scalar_one() \
            == event.title
    assert len(read_all(isettings, isettings.vectors_topic, 4)) == 1


def test_newer_version_wins_and_delete_removes_the_vector(isettings, kafka_clients, engine, embedder,
                                                          sample_events):
    consumer, producer = kafka_clients
    event = sample_events[20]
    renamed = event.model_copy(update={"version": 2, "title": "Renamed"})
    deleted = CatalogEvent(op="delete", product_id=event.product_id, version=3)
    late = event.model_copy(update={"version": 2, "title": "Too late"})
    indexer = Indexer(isettings, engine, producer, embedder)
    publish(isettings.kafka_bootstrap, isettings.products_topic, [event, renamed])
    run_until(indexer, consumer, lambda t: t.applied + t.stale == 2)
    with engine.connect() as conn:
        assert conn.execute(sa.select(products.c.title).where(products.c.id == event.product_id)).scalar_one() \
            == "Renamed"

    publish(isettings.kafka_bootstrap, isettings.products_topic, [deleted, late])
    run_until(indexer, consumer, lambda t: t.applied + t.stale == 2)
    with engine.connect() as conn:
        row = conn.execute(sa.select(products.c.deleted, products.c.version)
                           .where(products.c.id == event.product_id)).one()
        vectors = conn.execute(sa.select(sa.func.count()).where(
            product_vectors.c.product_id == event.product_id)).scalar_one()
    assert (row.deleted, row.version, vectors) == (True, 3, 0)
    ops = [VectorChange.model_validate_json(r.value).op for r in read_all(isettings, isettings.vectors_topic, 4)]
    assert ops[-1] == "delete"


def test_invalid_events_go_to_the_dead_letter_topic_with_the_reason(isettings, kafka_clients, engine, embedder,
                                                                    sample_events, monkeypatch):
    consumer, producer = kafka_clients
    good = sample_events[21]
    not_an_image = sample_events[22].model_copy(update={"image": ImageRef(data="aGVsbG8=")})
    # A broken AVIF made Pillow raise RuntimeError, which stopped the indexer on every replay.
    avif = sample_events[36].model_copy(update={"image": ImageRef(data=base64.b64encode(avif_broken()).decode())})
    # A decoder failing in a way it does not name (fault injected): the event is dead-lettered all the same.
    boom = base64.b64encode(b"\xff\xd8\xffboom").decode()
    breaking = sample_events[37].model_copy(update={"image": ImageRef(data=boom)})

    def decoder(data, *args, **kwargs):
        if data.endswith(b"boom"):
            raise RuntimeError("decoder bug")
        return decode_reduced(data, *args, **kwargs)
    monkeypatch.setattr("workers.indexer.decode_reduced", decoder)
    raw = KafkaProducer(bootstrap_servers=isettings.kafka_bootstrap)
    raw.send(isettings.products_topic, key=b"1", value=b"{not json")
    raw.send(isettings.products_topic, key=b"2", value=b'{"op": "upsert", "product_id": 2, "version": 1}')
    # What PostgreSQL cannot store stopped the partition (a NUL: ValueError; a 3,000-character
    # master_category: its index row too large, an OperationalError retried for ever).
    for key, change in ((b"3", {"title": "a\u0000b"}), (b"4", {"master_category": "x" * 3000})):
        event = {**good.model_dump(mode="json"), "product_id": int(key), **change}
        raw.send(isettings.products_topic, key=key, value=json.dumps(event).encode())
    raw.flush()
    raw.close()
    publish(isettings.kafka_bootstrap, isettings.products_topic, [good, not_an_image, avif, breaking])
    indexer = Indexer(isettings, engine, producer, embedder)
    total = run_until(indexer, consumer, lambda t: t.applied + t.dead == 8)
    assert (total.applied, total.dead) == (1, 7)

    letters = [DeadLetter.model_validate_json(r.value) for r in read_all(isettings, isettings.dlq_topic, 1)]
    reasons = {letter.key: letter.reason for letter in letters}
    assert "Invalid JSON" in reasons["1"]
    assert "an upsert needs title, master_category, image" in reasons["2"]
    assert "not an image" in reasons[str(not_an_image.product_id)]
    assert "not an image" in reasons[str(avif.product_id)]
    assert "could not be decoded (RuntimeError: decoder bug)" in reasons[str(breaking.product_id)]
    assert "contains a NUL character" in reasons["3"] and "at most 200 characters" in reasons["4"]
    assert all(letter.topic == isettings.products_topic and letter.offset >= 0 for letter in letters)
    highwater = {tp.partition: consumer.highwater(tp) for tp in consumer.assignment()}
    assert committed(consumer, isettings) == {p: highwater.get(p) or None for p in range(isettings.partitions)}

    # An operator lists them and replays one: the same event comes back and is refused again. Something
    # else written to the dead-letter topic is skipped, not the end of the listing.
    raw = KafkaProducer(bootstrap_servers=isettings.kafka_bootstrap)
    raw.send(isettings.dlq_topic, value=b"not a dead letter").get(timeout=30)
    raw.close()
    listed = list(dlq.read(isettings))
    assert [letter for _, letter in listed] == letters
    assert dlq.replay(isettings, {listed[0][0]}) == 1
    run_until(indexer, consumer, lambda t: t.dead == 1)
    again = [letter for _, letter in dlq.read(isettings)]
    assert len(again) == 8 and again[-1].payload == listed[0][1].payload
    assert (again[-1].partition, again[-1].offset) != (listed[0][1].partition, listed[0][1].offset)



def test_lag_is_reported_per_partition_and_changes_carry_the_source_timestamp(isettings, engine, embedder,
                                                                              sample_events):
    isettings = isettings.model_copy(update={"batch_size": 2})  # many small polls: lag shows in between
    consumer, producer = consumer_for(isettings), topics.producer(isettings.kafka_bootstrap)
    events = sample_events[24:36]
    publish(isettings.kafka_bootstrap, isettings.products_topic, events)
    indexer = Indexer(isettings, engine, producer, embedder)

    def lags() -> dict[int, float | None]:
        return {p: REGISTRY.get_sample_value("lookalike_indexer_lag_events", {"partition": str(p)})
                for p in range(isettings.partitions)}

    seen, applied, deadline = [], 0, time.monotonic() + 60
    while applied < len(events):
        assert time.monotonic() < deadline, f"{applied}/{len(events)} applied"
        applied += (step(indexer, consumer) or Outcome()).applied
        seen.append(sum(lag or 0 for lag in lags().values()))
    for _ in range(3):  # every partition has had a fetch response by now
        step(indexer, consumer)
    consumer.close()
    producer.close()
    assert max(seen) > 0
    assert lags() == {p: 0.0 for p in range(isettings.partitions)}

    published = {int(r.key): r.timestamp for r in read_all(isettings, isettings.products_topic, 4)}
    changes = [VectorChange.model_validate_json(r.value) for r in read_all(isettings, isettings.vectors_topic, 4)]
    assert {c.product_id: c.source_timestamp_ms for c in changes} == published


@pytest.fixture
def image_server(sample_events):
    """A real HTTP server on 127.0.0.1 serving the sample photos at /<product id>.jpg."""
    def photo(name: str) -> bytes | None:
        path = SAMPLE / "images" / name
        return path.read_bytes() if path.is_file() else None

    with serve_photos(photo) as url:
        yield url


def test_image_urls_are_fetched_through_the_ssrf_guard(isettings, kafka_clients, engine, embedder, sample_events,
                                                        image_server):
    consumer, producer = kafka_clients
    by_url = [e.model_copy(update={"image": ImageRef(url=f"{image_server}/{e.product_id - ID_OFFSET}.jpg")})
              for e in sample_events[40:43]]
    missing = sample_events[43].model_copy(update={"image": ImageRef(url=f"{image_server}/nothing.jpg")})
    publish(isettings.kafka_bootstrap, isettings.products_topic, [*by_url, missing])
    allowing = Indexer(isettings.model_copy(update={"fetch_allow_private": True}), engine, producer, embedder)
    total = run_until(allowing, consumer, lambda t: t.applied + t.dead == 4)
    assert (total.applied, total.dead) == (3, 1)
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.select(products.c.id, products.c.image_url)
                                   .where(products.c.id.in_([e.product_id for e in by_url]))).tuples().all())
    assert stored == {e.product_id: e.image.url for e in by_url}
    letters = [DeadLetter.model_validate_json(r.value) for r in read_all(isettings, isettings.dlq_topic, 1)]
    assert "HTTP 404" in letters[-1].reason and letters[-1].key == str(missing.product_id)

    refused = sample_events[44].model_copy(update={"version": 5, "image": by_url[0].image})
    publish(isettings.kafka_bootstrap, isettings.products_topic, [refused])
    guarded = Indexer(isettings, engine, producer, embedder)  # LOOKALIKE_FETCH_ALLOW_PRIVATE off
    assert run_until(guarded, consumer, lambda t: t.dead == 1).dead == 1
    letters = [DeadLetter.model_validate_json(r.value) for r in read_all(isettings, isettings.dlq_topic, 1)]
    assert "a loopback address" in letters[-1].reason and "LOOKALIKE_FETCH_ALLOW_PRIVATE" in letters[-1].reason


def test_a_shard_given_up_is_snapshotted_off_the_callers_thread_and_built_again_from_that_snapshot(
        isettings, kafka_clients, engine, embedder, sample_events, tmp_path, monkeypatch):
    """kafka-python calls ``revoke`` on the thread that sends heartbeats: another thread writes the
    snapshot, and building the shard again waits for it."""
    consumer, producer = kafka_clients
    indexer = Indexer(isettings.model_copy(update={"snapshot_dir": tmp_path, "snapshot_interval_s": 3600.0}),
                      engine, producer, embedder)
    for partition in range(isettings.partitions):
        indexer.own(partition, indexer.build(partition))
    events = sample_events[45:57]
    publish(isettings.kafka_bootstrap, isettings.products_topic, events)
    run_until(indexer, consumer, lambda t: t.applied == len(events))
    partition = max(indexer.shards, key=lambda p: indexer.shards[p].changes)
    given_up = indexer.shards[partition]
    ids = sorted(given_up.shard.ids().tolist())

    release, writers, write = threading.Event(), [], snapshots.write

    def held_write(*args, **kwargs):
        writers.append(threading.current_thread())
        assert release.wait(60)
        return write(*args, **kwargs)

    monkeypatch.setattr(snapshots, "write", held_write)
    indexer.revoke([partition])
    assert partition not in indexer.shards
    assert snapshots.newest(tmp_path, isettings.model_version, partition) is None  # held in held_write
    threading.Timer(0.2, release.set).start()
    built = indexer.build(partition)
    assert writers and writers[0] is not threading.current_thread()
    assert built.snapshot_offset == given_up.next_offset is not None
    assert sorted(built.shard.ids().tolist()) == ids
    indexer.close()


def test_an_image_path_is_checked_before_it_is_read(isettings, kafka_clients, engine, embedder, sample_events,
                                                    tmp_path):
    """A FIFO would block the partition, a file over LOOKALIKE_MAX_IMAGE_BYTES would be read whole."""
    _, producer = kafka_clients
    settings = isettings.model_copy(update={"image_roots": [tmp_path], "max_image_bytes": 4096})
    indexer = Indexer(settings, engine, producer, embedder)
    os.mkfifo(tmp_path / "pipe.jpg")
    with open(tmp_path / "huge.jpg", "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB long, nothing written
    (tmp_path / "small.jpg").write_bytes(b"\xff\xd8\xff small")
    for name, code, words in (("pipe.jpg", "unreadable", "not a regular file"),
                              ("huge.jpg", "too_large", "1073741824 bytes, more than the 4096-byte limit")):
        event = sample_events[0].model_copy(update={"image": ImageRef(path=str(tmp_path / name))})
        with pytest.raises(ImageRejected) as caught:
            indexer.image_bytes(event)
        assert (caught.value.code, words in caught.value.message) == (code, True), caught.value.message
    small = sample_events[0].model_copy(update={"image": ImageRef(path=str(tmp_path / "small.jpg"))})
    assert indexer.image_bytes(small) == b"\xff\xd8\xff small"
