"""Every Prometheus metric of the gateway (names ``lookalike_<what>_<unit>``), served on ``/metrics``."""

from __future__ import annotations

import redis
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REQUESTS = Counter("lookalike_http_requests_total", "HTTP requests by route template and status.",
                   ["route", "status"])
REQUEST_SECONDS = Histogram("lookalike_http_request_seconds", "HTTP request time by route template.", ["route"])
JOBS_SUBMITTED = Counter("lookalike_jobs_submitted_total", "Search jobs accepted (202).")
UPLOADS_REJECTED = Counter("lookalike_uploads_rejected_total", "Uploads refused, by reason.", ["code"])
REQUESTS_REFUSED = Counter("lookalike_requests_refused_total", "Requests refused for load: queue_full (a job "
                           "while the vision queue is full) or rate_limited (a catalog write past the key's rate).",
                           ["reason"])
CATALOG_EVENTS = Counter("lookalike_catalog_events_published_total", "Catalog events the gateway put on Kafka, by op.",
                         ["op"])


class QueueDepth(Collector):
    """``lookalike_queue_depth_jobs{queue}``: jobs waiting in the Celery queue, read at scrape time.

    Celery's Redis transport keeps a queue as a Redis list named after it, so the depth is its
    ``LLEN``. No sample while Redis does not answer (``/readyz`` says why).
    """

    NAME = "lookalike_queue_depth_jobs"
    LABELS = ("queue",)
    HELP = "Jobs waiting in the Celery queue (LLEN of its Redis list), read at scrape time."

    def __init__(self) -> None:
        self.client: redis.Redis | None = None
        self.queue = ""

    def watch(self, client: redis.Redis, queue: str) -> None:
        self.client, self.queue = client, queue

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)]

    def collect(self):
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)
        if self.client is not None:
            try:
                family.add_metric([self.queue], self.client.llen(self.queue))
            except redis.RedisError:
                pass
        yield family


QUEUE_DEPTH = QueueDepth()
REGISTRY.register(QUEUE_DEPTH)
