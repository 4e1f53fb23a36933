"""How the indexer follows its group's rebalances: when _Ownership builds and drops shards, and when
TopicWatch rejoins the group. Fast unit tests with fakes (the recoveries they exist for run against
a real broker in test_recovery.py)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from kafka import TopicPartition

from schemas.settings import IndexerSettings
from workers import indexer as indexer_module
from workers.indexer import TopicWatch, _Ownership

SESSION_S = 6.0


class FakeConsumer:
    """The four calls TopicWatch makes; ``rejoins`` counts unsubscribe + subscribe."""

    def __init__(self, topics: set[str], assignment: set[TopicPartition]) -> None:
        self.topic_names, self.assigned, self.rejoins = topics, assignment, 0

    def topics(self) -> set[str]:
        return set(self.topic_names)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def unsubscribe(self) -> None:
        self.assigned = set()

    def subscribe(self, topics, listener) -> None:
        self.rejoins += 1


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(indexer_module.time, "monotonic", lambda: now[0])
    return now


def watch_for(consumer: FakeConsumer, shards: dict) -> tuple[TopicWatch, _Ownership]:
    settings = IndexerSettings(products_topic="p", session_timeout_ms=int(SESSION_S * 1000), topic_check_interval_s=1)
    listener = _Ownership(SimpleNamespace(shards=shards))
    return TopicWatch(consumer, settings, listener), listener


def run_for(watch: TopicWatch, clock: list[float], seconds: float) -> None:
    """Check once a second for ``seconds``."""
    for _ in range(int(seconds)):
        clock[0] += 1.0
        watch.check()


def test_a_rebalance_that_revoked_everything_and_never_finished_is_rejoined_after_three_sessions(clock):
    consumer = FakeConsumer({"p"}, {TopicPartition("p", 0), TopicPartition("p", 1)})
    watch, _ = watch_for(consumer, shards={})  # revoked: the consumer still lists them
    watch.check()
    run_for(watch, clock, 3 * SESSION_S - 1)
    assert consumer.rejoins == 0
    run_for(watch, clock, 1)
    assert consumer.rejoins == 1
    consumer.assigned = {TopicPartition("p", 0)}  # the new join is as slow: not again before 3 sessions
    run_for(watch, clock, 3 * SESSION_S - 1)
    assert consumer.rejoins == 1


def test_a_member_that_owns_shards_or_is_building_them_never_rejoins(clock):
    consumer = FakeConsumer({"p"}, {TopicPartition("p", 0)})
    watch, listener = watch_for(consumer, shards={0: object()})
    run_for(watch, clock, 10 * SESSION_S)
    listener.indexer.shards = {}
    listener.on_partitions_assigned([TopicPartition("p", 0)])  # assigned, its shard not built yet
    run_for(watch, clock, 10 * SESSION_S)
    assert consumer.rejoins == 0


def test_more_members_than_partitions_leaves_one_idle_without_rejoining(clock):
    consumer = FakeConsumer({"p"}, set())
    watch, _ = watch_for(consumer, shards={})
    run_for(watch, clock, 10 * SESSION_S)
    assert consumer.rejoins == 0


def test_after_recreating_the_topics_an_empty_handed_member_rejoins(clock, monkeypatch):
    consumer = FakeConsumer(set(), set())
    monkeypatch.setattr(indexer_module.topics, "create_topics",
                        lambda settings: consumer.topic_names.add(settings.products_topic))
    watch, _ = watch_for(consumer, shards={})
    watch.check()
    assert consumer.topics() == {"p"}
    run_for(watch, clock, 3 * SESSION_S)
    assert consumer.rejoins == 1
    run_for(watch, clock, indexer_module.RECREATED_WATCH_S)  # then, owning none is taken as right
    rejoins = consumer.rejoins
    run_for(watch, clock, 10 * SESSION_S)
    assert consumer.rejoins == rejoins


class FakeIndexer:
    """Builds a shard as a string; ``during_build`` runs inside build (a listener called meanwhile,
    which kafka-python 3.0.12 does not do: ``_Ownership``'s guard against it)."""

    def __init__(self) -> None:
        self.shards: dict[int, str] = {}
        self.built: list[int] = []
        self.during_build = lambda partition: None

    def build(self, partition: int) -> str:
        self.built.append(partition)
        self.during_build(partition)
        return f"shard {partition}"

    def own(self, partition: int, owned: str) -> None:
        self.shards[partition] = owned

    def revoke(self, partitions: list[int]) -> None:
        for partition in partitions:
            self.shards.pop(partition, None)


def test_an_assignment_is_only_noted_on_the_kafka_thread_and_built_by_the_poll_loop():
    indexer = FakeIndexer()
    listener = _Ownership(indexer)
    listener.on_partitions_assigned([TopicPartition("p", 1), TopicPartition("p", 0)])
    assert indexer.built == [] and listener.pending == {0: 1, 1: 1}
    thread = threading.Thread(target=listener.build)  # not the thread that noted it
    thread.start()
    thread.join()
    assert indexer.shards == {0: "shard 0", 1: "shard 1"} and listener.pending == {}
    listener.build()
    assert indexer.built == [0, 1]  # nothing built twice


def test_a_shard_revoked_while_it_is_built_is_dropped_and_one_assigned_again_is_rebuilt():
    indexer = FakeIndexer()
    listener = _Ownership(indexer)
    listener.on_partitions_assigned([TopicPartition("p", 0), TopicPartition("p", 1)])
    indexer.during_build = lambda partition: listener.on_partitions_revoked([TopicPartition("p", 0)])
    listener.build()
    assert indexer.shards == {1: "shard 1"} and listener.pending == {}

    # Revoked and assigned again while it was built: the shard built may miss what another owner
    # wrote in between, so it is built again from the newer assignment.
    def rebalance(partition: int) -> None:
        indexer.during_build = lambda partition: None
        listener.on_partitions_revoked([TopicPartition("p", 2)])
        listener.on_partitions_assigned([TopicPartition("p", 2)])

    listener.on_partitions_assigned([TopicPartition("p", 2)])
    indexer.during_build = rebalance
    listener.build()
    assert 2 not in indexer.shards and listener.pending == {2: 3}
    listener.build()
    assert indexer.shards[2] == "shard 2" and indexer.built == [0, 1, 2, 2]


def test_a_shard_that_cannot_be_built_yet_stays_pending(caplog):
    indexer = FakeIndexer()
    listener = _Ownership(indexer)
    listener.on_partitions_assigned([TopicPartition("p", 0)])

    def postgres_down(partition: int) -> None:
        raise sa.exc.OperationalError("SELECT", {}, Exception("connection refused"))

    indexer.during_build = postgres_down
    listener.build()
    assert indexer.shards == {} and listener.pending == {0: 1}
    assert "cannot build shard 0 yet" in caplog.text
    indexer.during_build = lambda partition: None
    listener.build()
    assert indexer.shards == {0: "shard 0"}
