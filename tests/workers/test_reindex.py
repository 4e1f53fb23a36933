"""``lookalike reindex`` (workers.reindex) against real PostgreSQL and a Kafka-protocol broker."""

from __future__ import annotations

import copy
import uuid

import pytest
import sqlalchemy as sa

from ops.publish import publish, read_catalog
from schemas.events import CatalogEvent
from schemas.settings import IndexerSettings
from schemas.tables import product_vectors
from tests.conftest import SAMPLE
from tests.workers.test_indexer import run_until
from tests.workers.test_recovery import live_ids
from workers import reindex, snapshots, topics
from workers.indexer import Indexer, consumer_for
from workers.replica import still_in_log
from workers.topics import create_topics

ID_OFFSET = 9_300_000


@pytest.fixture
def isettings(settings, tmp_path) -> IndexerSettings:
    name = uuid.uuid4().hex[:8]
    isettings = IndexerSettings(**{**settings.model_dump(), "products_topic": f"{name}.products",
                                   "vectors_topic": f"{name}.vectors", "dlq_topic": f"{name}.dlq",
                                   "group_id": f"indexer-{name}", "model_version": f"reindex-{name}",
                                   "snapshot_dir": tmp_path / "snapshots"})
    create_topics(isettings)
    return isettings


def snapshot_ids(isettings, model_version: str) -> dict[int, set[int]]:
    found = {}
    for partition in range(isettings.partitions):
        shard = snapshots.newest(isettings.snapshot_dir, model_version, partition).load()
        ids = shard.ids().tolist()
        assert len(ids) == shard.ntotal == len(set(ids))
        if ids:
            found[partition] = set(ids)
    return found


def test_reindex_rebuilds_the_shards_and_switches_model_version_by_re_embedding(isettings, engine, embedder):
    events, errors = read_catalog(SAMPLE / "products.csv", SAMPLE / "images", version=1)
    assert not errors
    events = [e.model_copy(update={"product_id": e.product_id + ID_OFFSET}) for e in events[:16]]
    deletes = [CatalogEvent(op="delete", product_id=e.product_id, version=2) for e in events[:3]]
    consumer, producer = consumer_for(isettings), topics.producer(isettings.kafka_bootstrap)
    try:
        own = copy.copy(embedder)  # the loaded model, under this test's own model version
        own.model_version = isettings.model_version
        indexer = Indexer(isettings, engine, producer, own)
        publish(isettings.kafka_bootstrap, isettings.products_topic, events)
        run_until(indexer, consumer, lambda t: t.applied == len(events))
        publish(isettings.kafka_bootstrap, isettings.products_topic, deletes)
        run_until(indexer, consumer, lambda t: t.applied == len(deletes))
    finally:
        consumer.close()
        producer.close()
    mine = {e.product_id for e in events[3:]}

    # Same model version: shards from the stored vectors, at the changelog's end, usable by replicas.
    report = reindex.run(isettings, engine)
    assert report.embedded == 0
    assert snapshot_ids(isettings, isettings.model_version) == live_ids(engine, isettings.model_version)
    assert set().union(*snapshot_ids(isettings, isettings.model_version).values()) == mine
    for partition in range(isettings.partitions):
        newest = snapshots.newest(isettings.snapshot_dir, isettings.model_version, partition)
        assert newest.offset == 0 or still_in_log(isettings.kafka_bootstrap, isettings.vectors_topic, newest)
    assert any(snapshots.newest(isettings.snapshot_dir, isettings.model_version, p).offset > 0 for p in range(4))

    # A new model version: every live product embedded (from its thumbnail), shards of its own.
    version = f"{isettings.model_version}-v2"
    report = reindex.run(isettings, engine, version)
    assert report.embedded >= len(mine)
    new = live_ids(engine, version)
    assert mine <= set().union(*new.values())
    assert not {e.product_id for e in events[:3]} & set().union(*new.values())
    assert snapshot_ids(isettings, version) == new
    with engine.connect() as conn:  # same shard as the product's other vectors
        rows = conn.execute(sa.select(product_vectors.c.product_id, product_vectors.c.model_version,
                                      product_vectors.c.shard)
                            .where(product_vectors.c.product_id.in_(mine))).all()
    shards = {}
    for row in rows:
        shards.setdefault(row.product_id, set()).add(row.shard)
    assert all(len(s) == 1 for s in shards.values())
    # Run again: nothing left to embed.
    assert reindex.run(isettings, engine, version).embedded == 0
