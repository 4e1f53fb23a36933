"""Replica.apply on changelog records, without a broker (fast unit test; tests/workers/test_recovery.py
tails the real changelog)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np

from schemas.events import VectorChange
from schemas.settings import WorkerSettings
from workers.replica import Replica


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
