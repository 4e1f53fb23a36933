"""Recovery of the streaming index, against real PostgreSQL, Redis and Kafka-protocol brokers.

The indexer runs as a real process (``python -m workers.indexer``) and is killed with SIGKILL;
replicas are the workers' own :class:`workers.replica.Replica`, run in this process so their
shards can be inspected id by id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
import sqlalchemy as sa
from kafka import KafkaConsumer, TopicPartition

from ops.publish import publish, read_catalog
from ops.stack import LocalStack
from schemas.events import CatalogEvent
from schemas.jobs import JobStore
from schemas.settings import IndexerSettings, WorkerSettings
from schemas.tables import product_vectors, products
from tests.conftest import ROOT, SAMPLE
from workers import snapshots
from workers.embed import DIM
from workers.replica import Replica
from workers.topics import create_topics



@pytest.fixture
def names(tmp_path) -> dict[str, str]:
    """Topics, group, model version and snapshot directory of this test's own."""
    name = uuid.uuid4().hex[:8]
    return {"LOOKALIKE_PRODUCTS_TOPIC": f"{name}.products", "LOOKALIKE_VECTORS_TOPIC": f"{name}.vectors",
            "LOOKALIKE_DLQ_TOPIC": f"{name}.dlq", "LOOKALIKE_GROUP_ID": f"indexer-{name}",
            "LOOKALIKE_MODEL_VERSION": f"recovery-{name}", "LOOKALIKE_SNAPSHOT_DIR": str(tmp_path / "snapshots"),
            "LOOKALIKE_SNAPSHOT_EVERY_CHANGES": "25", "LOOKALIKE_SNAPSHOT_INTERVAL_S": "1",
            "LOOKALIKE_BATCH_SIZE": "8", "LOOKALIKE_EMBED_BATCH": "8"}


class Indexers:
    """Indexer processes with the test's environment; all killed at the end."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir, self.procs = env, log_dir, []

    def start(self) -> subprocess.Popen:
        log = open(self.log_dir / f"indexer-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "workers.indexer"], cwd=ROOT, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def env(stack, names) -> dict[str, str]:
    return {**os.environ, **stack, **names}


@pytest.fixture
def indexers(env, tmp_path):
    started = Indexers(env, tmp_path)
    yield started
    started.stop_all()


def settings_from(env: dict[str, str], cls):
    keys = {k: v for k, v in env.items() if k.startswith("LOOKALIKE_") and not k.startswith("LOOKALIKE_TEST")}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        return cls()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def sample(n: int, id_offset: int) -> list[CatalogEvent]:
    """``n`` sample products under ids of the caller's own (products rows are shared by tests)."""
    events, errors = read_catalog(SAMPLE / "products.csv", SAMPLE / "images", version=1)
    assert not errors
    return [e.model_copy(update={"product_id": e.product_id + id_offset}) for e in events[:n]]


def live_ids(engine: sa.Engine, model_version: str) -> dict[int, set[int]]:
    """Shard -> ids of live products with a vector of ``model_version``, from Postgres."""
    query = (sa.select(product_vectors.c.shard, product_vectors.c.product_id)
             .join(products, products.c.id == product_vectors.c.product_id)
             .where(product_vectors.c.model_version == model_version, products.c.deleted.is_(False)))
    found: dict[int, set[int]] = {}
    with engine.connect() as conn:
        for shard, product_id in conn.execute(query):
            found.setdefault(shard, set()).add(product_id)
    return found


def replica_ids(replica: Replica) -> dict[int, set[int]]:
    """Shard -> ids, asserting no id is held twice in a shard (ntotal counts every copy)."""
    found = {}
    for number, shard in enumerate(replica.shards.shards):
        ids = shard.ids()
        assert len(ids) == shard.ntotal == len(set(ids.tolist())), f"shard {number} holds duplicates"
        if len(ids):
            found[number] = set(ids.tolist())
    return found


def wait_for(what: str, condition, timeout_s: float = 120, logs: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            tail = "".join(p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("*.log"))) if logs else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.25)


def committed_total(settings: IndexerSettings) -> int:
    """How many input events the indexer group has committed past, over all partitions (the
    published count is known, so this avoids Tansu's too-low end_offsets())."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.group_id,
                             enable_auto_commit=False)
    try:
        return sum(consumer.committed(TopicPartition(settings.products_topic, p)) or 0
                   for p in range(settings.partitions))
    finally:
        consumer.close()


def test_kill_9_the_indexer_mid_batch_loses_and_duplicates_nothing(env, indexers, engine, tmp_path):
    isettings, wsettings = settings_from(env, IndexerSettings), settings_from(env, WorkerSettings)
    create_topics(isettings)
    store = JobStore(redis.Redis.from_url(wsettings.redis_url), wsettings.job_ttl_s)
    survivor = Replica(wsettings, engine, store, DIM)
    survivor.start()
    try:
        events = sample(160, id_offset=8_000_000)
        changes = [e.model_copy(update={"version": 2, "title": "Updated"}) for e in events[:20]]
        changes += [CatalogEvent(op="delete", product_id=e.product_id, version=2) for e in events[20:40]]
        publish(isettings.kafka_bootstrap, isettings.products_topic, events + changes)

        first = indexers.start()
        ids = [e.product_id for e in events]
        count = sa.select(sa.func.count()).where(product_vectors.c.product_id.in_(ids),
                                                 product_vectors.c.model_version == isettings.model_version)
        with engine.connect() as conn:
            wait_for("the first products", lambda: conn.execute(count).scalar_one() >= 30, logs=tmp_path)
        first.send_signal(signal.SIGKILL)
        first.wait()

        indexers.start()
        wait_for("the restarted indexer to consume everything",
                 lambda: committed_total(isettings) == len(events + changes), timeout_s=180, logs=tmp_path)
        expected = live_ids(engine, isettings.model_version)
        assert sum(len(v) for v in expected.values()) == 140
        wait_for("the surviving replica to converge", lambda: replica_ids(survivor) == expected, logs=tmp_path)

        # A new worker starts from the snapshots plus the changelog and answers like the survivor.
        assert any(snapshots.listing(isettings.snapshot_dir, isettings.model_version, p) for p in range(4))
        newcomer = Replica(wsettings, engine, store, DIM)
        newcomer.start()
        try:
            assert any(offset > 0 for offset in newcomer.start_offsets.values()), "no snapshot was used"
            wait_for("the new replica to converge", lambda: replica_ids(newcomer) == expected, logs=tmp_path)
            queries = np.random.default_rng(0).standard_normal((10, DIM)).astype(np.float32)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            np.testing.assert_array_equal(newcomer.shards.search(queries, 10)[1],
                                          survivor.shards.search(queries, 10)[1])
        finally:
            newcomer.stop()
    finally:
        survivor.stop()


def test_a_broker_that_lost_everything_is_recovered_from_postgres(env, indexers, engine, tmp_path):
    with LocalStack(tmp_path / "own-broker", env={k: v for k, v in env.items()
                                                   if k != "LOOKALIKE_KAFKA_BOOTSTRAP"},
                    services=("kafka",)) as broker:
        # Checked often, the topics are usually found missing before a metadata request makes
        # Tansu auto-create them, so the indexer recreates them and its group rebalances meanwhile.
        local = {**env, **broker.environ(), "LOOKALIKE_TOPIC_CHECK_INTERVAL_S": "0.3"}
        indexers.env = local
        isettings, wsettings = settings_from(local, IndexerSettings), settings_from(local, WorkerSettings)
        create_topics(isettings)
        store = JobStore(redis.Redis.from_url(wsettings.redis_url), wsettings.job_ttl_s)
        replica = Replica(wsettings, engine, store, DIM)
        replica.start()
        try:
            events = sample(60, id_offset=8_100_000)
            publish(isettings.kafka_bootstrap, isettings.products_topic, events[:40])
            indexers.start()
            wait_for("40 products", lambda: sum(map(len, live_ids(engine, isettings.model_version).values())) == 40
                     and replica_ids(replica) == live_ids(engine, isettings.model_version), logs=tmp_path)

            broker.restart_kafka()  # memory storage: topics, offsets and the changelog are gone

            admin_topics = lambda: KafkaConsumer(bootstrap_servers=isettings.kafka_bootstrap).topics()  # noqa: E731
            wait_for("the indexer to recreate the topics", lambda: isettings.products_topic in admin_topics(),
                     timeout_s=60, logs=tmp_path)
            publish(isettings.kafka_bootstrap, isettings.products_topic, events[40:])
            wait_for("all 60 products in postgres and the replica",
                     lambda: sum(map(len, live_ids(engine, isettings.model_version).values())) == 60
                     and replica_ids(replica) == live_ids(engine, isettings.model_version),
                     timeout_s=180, logs=tmp_path)
        finally:
            replica.stop()


def snapshot_ids(settings: IndexerSettings) -> dict[int, set[int]]:
    """Shard -> ids of its newest snapshot, asserting no id is held twice (ntotal counts every copy)."""
    found = {}
    for partition in range(settings.partitions):
        newest = snapshots.newest(settings.snapshot_dir, settings.model_version, partition)
        if newest is None:
            continue
        shard = newest.load()
        ids = shard.ids()
        assert len(ids) == shard.ntotal == len(set(ids.tolist())), f"snapshot of shard {partition} holds duplicates"
        if len(ids):
            found[partition] = set(ids.tolist())
    return found


def owned_shards(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if "own shard" in line]


def shards_owned_now(log: Path) -> set[int]:
    """The shards the indexer writing ``log`` owns now: taken ("own shard N") and not given up."""
    owned: set[int] = set()
    for line in log.read_text(errors="replace").splitlines():
        if "own shard " in line:
            owned.add(int(line.split("own shard ")[1].split(":")[0]))
        elif "gave up shard " in line:
            owned.discard(int(line.split("gave up shard ")[1].split()[0]))
    return owned


def changelog_end(settings: IndexerSettings, partition: int) -> int:
    """The changelog's high watermark for ``partition``, read to its end (Tansu's
    end_offsets() can be too low)."""
    tp = TopicPartition(settings.vectors_topic, partition)
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False)
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        while True:
            records = consumer.poll(timeout_ms=200).get(tp, [])
            highwater = consumer.highwater(tp)
            if highwater is not None and consumer.position(tp) >= highwater and not records:
                return highwater
    finally:
        consumer.close()


def changes_past_snapshot(settings: IndexerSettings, log: Path) -> bool:
    """Whether a shard the indexer writing ``log`` owns has changelog records past its newest snapshot."""
    for partition in shards_owned_now(log):
        newest = snapshots.newest(settings.snapshot_dir, settings.model_version, partition)
        if newest is not None and changelog_end(settings, partition) > newest.offset:
            return True
    return False


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_two_indexers_share_the_partitions_and_one_takes_over_from_the_other(env, indexers, engine, tmp_path,
                                                                             stop):
    isettings = settings_from(env, IndexerSettings)
    create_topics(isettings)
    events = sample(120, id_offset=8_200_000 + 1_000 * int(stop))
    changes = [e.model_copy(update={"version": 2, "title": "Updated"}) for e in events[:15]]
    changes += [CatalogEvent(op="delete", product_id=e.product_id, version=2) for e in events[15:30]]
    publish(isettings.kafka_bootstrap, isettings.products_topic, events[:60])

    first = indexers.start()
    wait_for("the first 60 products", lambda: committed_total(isettings) == 60, logs=tmp_path)
    # The second never snapshots on its own (only when it gives shards up), so what it applies
    # is only in the changelog after the snapshots the first wrote when it handed shards over:
    # killed, the survivor must replay that to take its shards back.
    indexers.env = {**env, "LOOKALIKE_SNAPSHOT_EVERY_CHANGES": "1000000", "LOOKALIKE_SNAPSHOT_INTERVAL_S": "3600"}
    second = indexers.start()
    logs = [tmp_path / "indexer-0.log", tmp_path / "indexer-1.log"]
    # Both own some shards once the group has rebalanced (Tansu lets the second member in after
    # about half the session timeout).
    wait_for("both indexers to own shards", lambda: all(shards_owned_now(p) for p in logs), logs=tmp_path)
    publish(isettings.kafka_bootstrap, isettings.products_topic, events[60:] + changes[:10])
    wait_for("the second indexer to apply changes past a snapshot",
             lambda: changes_past_snapshot(isettings, logs[1]), logs=tmp_path)
    before = len(owned_shards(logs[0]))
    second.send_signal(stop)
    second.wait()
    publish(isettings.kafka_bootstrap, isettings.products_topic, changes[10:])
    wait_for("the survivor to consume everything", lambda: committed_total(isettings) == len(events + changes),
             timeout_s=180, logs=tmp_path)
    took_over = owned_shards(logs[0])[before:]
    assert {line.split("own shard ")[1].split(":")[0] for line in took_over} == {"0", "1", "2", "3"}, took_over
    assert any("snapshot at offset" in line for line in took_over), took_over
    if stop == signal.SIGKILL:  # "snapshot at offset A + changelog to B" with B > A: changes replayed
        assert any(int(line.split("changelog to ")[1]) > int(line.split("snapshot at offset ")[1].split()[0])
                   for line in took_over if "changelog to" in line), took_over

    first.send_signal(signal.SIGTERM)  # it snapshots every shard it owns on the way out
    assert first.wait(timeout=60) == 0
    expected = live_ids(engine, isettings.model_version)
    assert sum(len(v) for v in expected.values()) == 105
    assert snapshot_ids(isettings) == expected
