"""workers/metrics.py: the metrics server of workers and indexers, and per-partition lag."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest
from kafka import TopicPartition
from prometheus_client import REGISTRY, Gauge

from workers import metrics


class Remember(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_port_0_serves_on_a_free_port_and_says_which():
    handler, logger = Remember(), logging.getLogger("workers.metrics")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        port = metrics.serve("127.0.0.1", 0)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert port > 0
    assert handler.lines == [f"metrics on http://127.0.0.1:{port}/metrics"]
    page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert "# TYPE lookalike_embedded_images_total counter" in page


def test_a_taken_port_is_refused_naming_the_setting():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="LOOKALIKE_METRICS_PORT"):
            metrics.serve("127.0.0.1", taken.getsockname()[1])


class FakeConsumer:
    """The three KafkaConsumer methods PartitionLag uses."""

    def __init__(self, highwater: dict[int, int | None], position: dict[int, int]) -> None:
        self.high, self.pos = highwater, position

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("t", p) for p in self.high}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.high[tp.partition]

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        return self.pos[tp.partition]


def test_partition_lag_is_highwater_minus_position_and_forgets_revoked_partitions():
    gauge = Gauge("lookalike_test_lag_events", "test only", ["partition"], registry=None)
    lag = metrics.PartitionLag(gauge)
    assert lag.update(FakeConsumer({0: 10, 1: 5, 2: None}, {0: 4, 1: 5, 2: 0})) == {0: 6, 1: 0}
    samples = {s.labels["partition"]: s.value for s in gauge.collect()[0].samples}
    assert samples == {"0": 6.0, "1": 0.0}  # 2: no fetch response yet, so no highwater

    lag.update(FakeConsumer({1: 7, 2: 3}, {1: 7, 2: 1}))  # partition 0 went to another consumer
    samples = {s.labels["partition"]: s.value for s in gauge.collect()[0].samples}
    assert samples == {"1": 0.0, "2": 2.0}


def test_gpu_memory_has_no_samples_on_the_cpu():
    assert REGISTRY.get_sample_value("lookalike_gpu_memory_bytes", {"device": "cuda:0", "kind": "allocated"}) is None
    (family,) = metrics.GpuMemory().collect()
    assert family.name == "lookalike_gpu_memory_bytes" and family.samples == []
