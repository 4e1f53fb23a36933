"""Every Prometheus metric of the worker and indexer processes (names ``lookalike_<what>_<unit>``).

Neither process is an HTTP server, so each serves these on a port of its own
(:func:`serve`, ``LOOKALIKE_METRICS_HOST``/``LOOKALIKE_METRICS_PORT``). Labels are of low
cardinality only: an outcome, an error code, a stage, a partition (= shard) number.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# --- indexer -------------------------------------------------------------------------------
EVENTS = Counter("lookalike_indexer_events_total", "Catalog events by outcome.", ["outcome"])
# outcome: applied | stale | dead_letter (one message on the DLQ topic each) | replayed
INDEXER_BATCH_SECONDS = Histogram("lookalike_indexer_batch_seconds", "One micro-batch, poll to commit.")
INDEXER_BATCH_EVENTS = Histogram("lookalike_indexer_batch_events", "Events in one micro-batch of one partition.",
                                 buckets=COUNT_BUCKETS)
SNAPSHOT_WRITTEN = Gauge("lookalike_snapshot_written_timestamp_seconds",
                         "When this indexer last wrote a snapshot of a shard (Unix time); the snapshot's age "
                         "is time() minus it.", ["shard"])
INDEXER_RETRIES = Counter("lookalike_indexer_retries_total", "Batches retried after a transient error.")
INDEXER_LAG = Gauge("lookalike_indexer_lag_events",
                    "Events of the products topic not yet processed: highwater - position, per partition "
                    "this indexer owns.", ["partition"])

# --- vision worker -------------------------------------------------------------------------
JOBS = Counter("lookalike_worker_jobs_total",
               "Search jobs finished, by outcome (done; rejected: the image was invalid; failed: "
               "the system's fault) and reason (the job's error code, empty when done).", ["outcome", "reason"])
STAGE_SECONDS = Histogram("lookalike_worker_stage_seconds",
                          "Job time by stage: queue_wait (submitted to started), decode, segment, embed, "
                          "nearest (the micro-batch's one search of the whole catalog), classify, search "
                          "(a filtered job's own), join, total (submitted to done).", ["stage"], buckets=SECONDS_BUCKETS)
MESSAGES_RESENT = Counter("lookalike_worker_messages_resent_total",
                          "Job messages the broker lost (a worker killed while taking them) and the "
                          "lost-message sweep sent again (workers/sweep.py).")
BATCH_JOBS = Histogram("lookalike_worker_batch_jobs", "Jobs in one micro-batch of the worker (celery-batches).",
                       buckets=COUNT_BUCKETS)
SHARD_VECTORS = Gauge("lookalike_shard_vectors", "Vectors in this process's replica of a shard.", ["shard"])
INDEXER_SHARD_VECTORS = Gauge("lookalike_indexer_shard_vectors",
                              "Vectors in a shard this indexer owns (the writer's copy; the workers' replicas "
                              "should converge to it).", ["shard"])
REPLICA_LAG = Gauge("lookalike_replica_lag_changes",
                    "Changes of the vectors topic not yet applied to this worker's replica: highwater - "
                    "position, per partition.", ["partition"])
REPLICA_FRESHNESS = Histogram("lookalike_replica_freshness_seconds",
                              "From the catalog event's Kafka timestamp to its vector applied on this worker's "
                              "replica; live changes only, not the catch-up replay at start.",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0))

# --- the model (both) ----------------------------------------------------------------------
MODEL_LOAD_SECONDS = Gauge("lookalike_model_load_seconds", "How long loading the embedding model took.",
                           ["model_version", "device"])
EMBED_BATCH_IMAGES = Histogram("lookalike_embed_batch_images", "Images in one forward pass of the model.",
                               buckets=COUNT_BUCKETS)
IMAGES_EMBEDDED = Counter("lookalike_embedded_images_total", "Images embedded; rate() of it is images/s.")


class GpuMemory(Collector):
    """``lookalike_gpu_memory_bytes{device, kind}``: CUDA memory of this process, read at scrape time.

    ``kind`` is ``allocated`` (held by tensors) or ``reserved`` (held by PyTorch's caching
    allocator). No samples unless :meth:`watch` was given a CUDA device.
    """

    NAME = "lookalike_gpu_memory_bytes"
    LABELS = ("device", "kind")
    HELP = "CUDA memory of this process: allocated by tensors, reserved by PyTorch's allocator."

    def __init__(self) -> None:
        self.device = None

    def watch(self, device) -> None:
        """Report ``device`` (a ``torch.device`` of type ``cuda``) from now on."""
        self.device = device

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)]

    def collect(self):
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)
        if self.device is not None:
            import torch  # already loaded by the process that set a CUDA device

            family.add_metric([str(self.device), "allocated"], torch.cuda.memory_allocated(self.device))
            family.add_metric([str(self.device), "reserved"], torch.cuda.memory_reserved(self.device))
        yield family


GPU_MEMORY = GpuMemory()
REGISTRY.register(GPU_MEMORY)


class PartitionLag:
    """Keeps a ``{partition}`` gauge at highwater - position of a consumer's assigned partitions.

    The highwater comes from the last fetch response (``KafkaConsumer.highwater``), so it costs no
    request; a partition is reported once it has one, and dropped when no longer assigned.
    """

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.partitions: set[int] = set()

    def update(self, consumer) -> dict[int, int]:
        """Set the gauge from ``consumer`` (a ``kafka.KafkaConsumer``). Returns ``{partition: lag}``."""
        lags = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            position = consumer.position(tp, timeout_ms=100) if high is not None else None
            if position is not None:
                lags[tp.partition] = max(0, high - position)
        for partition in self.partitions - set(lags):
            self.gauge.remove(str(partition))
        for partition, lag in lags.items():
            self.gauge.labels(str(partition)).set(lag)
        self.partitions = set(lags)
        return lags


def serve(host: str, port: int) -> int:
    """Serve ``/metrics`` from a daemon thread on ``host:port`` (0: a free port). Returns the port.

    Raises:
        OSError: the port is taken (set LOOKALIKE_METRICS_PORT to another, or 0).
    """
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {host}:{port} ({exc.strerror}); set "
                      "LOOKALIKE_METRICS_PORT to a free port, or 0 for any") from None
    port = server.server_port
    log.info("metrics on http://%s:%d/metrics", host, port)
    return port
