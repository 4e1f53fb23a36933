"""Replica.apply on changelog records, without a broker (fast unit test; tests/workers/test_recovery.py
tails the real changelog), and whether a snapshot's last record is still in a real broker's log."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from kafka import KafkaProducer

from schemas.events import VectorChange
from schemas.settings import WorkerSettings
from workers.replica import Replica, still_in_log
from workers.snapshots import Snapshot


def record(offset: int, value: bytes | str) -> SimpleNamespace:
    return SimpleNamespace(offset=offset, value=value.encode() if isinstance(value, str) else value)


def test_a_poll_is_applied_at_once_and_a_malformed_change_is_logged_and_skipped(caplog):
    settings = WorkerSettings(partitions=2)
    replica = Replica(settings, None, None, 4)
    v = np.eye(4, dtype=np.float32)

    def change(product_id: int, vector: np.ndarray | None, model_version: str = settings.model_version) -> str:
        return VectorChange.of(product_id, 1, model_version, vector).model_dump_json()

    records = [record(0, change(1, v[0])), record(1, change(2, v[1])), record(2, b"{not json"),
               record(3, change(3, np.ones(8, np.float32))),  # a vector of the wrong size
               record(4, change(4, v[2], "another-model")), record(5, change(1, None)), record(6, change(2, v[3]))]
    with caplog.at_level(logging.ERROR, logger="workers.replica"):
        replica.apply(1, records)
    shard = replica.shards.shards[1]
    assert shard.ids().tolist() == [2]  # 1 put then removed, 2 replaced, 3 malformed, 4 another model's
    scores, ids = shard.search(v[3:4], 1)
    assert ids[0, 0] == 2 and scores[0, 0] > 0.999
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and "@2" in logged[0] and "@3" in logged[1] and "expected 4" in logged[1]


def test_a_snapshot_is_usable_only_while_its_last_changelog_record_is_in_the_log(settings):
    topic = f"still-in-log-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    sent = [producer.send(topic, b"change", partition=0, timestamp_ms=1_000 + i).get(timeout=30) for i in range(3)]
    producer.close()
    assert [m.offset for m in sent] == [0, 1, 2]

    def usable(offset: int, last_timestamp_ms: int) -> bool:
        snapshot = Snapshot(Path("snapshot"), 0, 0, offset, last_timestamp_ms)
        return still_in_log(settings.kafka_bootstrap, topic, snapshot, timeout_s=60)

    assert usable(3, 1_002) and usable(2, 1_001)
    assert not usable(3, 1_001)  # another record at that offset: the log was rebuilt since
    assert not usable(0, 0)  # taken of an empty changelog
    start = time.monotonic()
    assert not usable(8, 1_007)  # the log ends before it (a broker that lost its log)
    assert time.monotonic() - start < 20, "waited for a record the high watermark says is not there"
