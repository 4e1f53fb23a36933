"""When the indexer's TopicWatch rejoins the group: fast unit tests with a fake consumer and clock
(the recovery it exists for runs against a real broker in test_recovery.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
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
    listener.assigning = True  # on_partitions_assigned is still building the first shard
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
