"""Catalog writes from HTTP: validated events onto ``catalog.products``, keyed by product id,
acknowledged by the broker before the gateway answers. The indexer does the rest."""

from __future__ import annotations

import threading

from kafka import KafkaProducer
from kafka.errors import KafkaError

from gateway.errors import ApiError
from schemas.events import CatalogEvent
from schemas.settings import GatewaySettings

MAX_EVENT_BYTES = 8 * 1024 * 1024  # the producers' max_request_size (ops.publish, workers.indexer)
SEND_TIMEOUT_S = 10


class CatalogPublisher:
    """A Kafka producer made on first use (the gateway starts without a broker), shared by threads."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()

    def publish(self, events: list[CatalogEvent]) -> None:
        """Send ``events`` in order and wait for the broker to acknowledge every one (blocking).

        Raises:
            ApiError: 413 an event larger than the broker takes; 503 the broker is unavailable.
        """
        payloads = [event.model_dump_json(exclude_none=True).encode() for event in events]
        for event, payload in zip(events, payloads):
            if len(payload) > MAX_EVENT_BYTES:
                raise ApiError(413, "too_large", f"product {event.product_id} is {len(payload)} bytes as an event, "
                               f"more than {MAX_EVENT_BYTES}; send a smaller image", "image")
        try:
            producer = self._get()
            futures = [producer.send(self.settings.products_topic, key=event.key(), value=payload)
                       for event, payload in zip(events, payloads)]
            producer.flush(timeout=SEND_TIMEOUT_S)
            for future in futures:
                future.get(timeout=SEND_TIMEOUT_S)
        except KafkaError as exc:
            raise ApiError(503, "unavailable", f"the catalog log (Kafka) did not take the events "
                           f"({type(exc).__name__}); retry: the same versions are harmless to send again",
                           headers={"Retry-After": "5"}) from None

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=5)
                self._producer = None

    def _get(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                self._producer = KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                                               linger_ms=5, max_request_size=MAX_EVENT_BYTES, max_block_ms=5000,
                                               request_timeout_ms=SEND_TIMEOUT_S * 1000,
                                               client_id="lookalike-gateway")
            return self._producer
