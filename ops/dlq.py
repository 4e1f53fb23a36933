"""Dead letters of ``catalog.products.dlq``: list them, and publish their payloads again."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator

from kafka import KafkaConsumer, TopicPartition
from pydantic import ValidationError

from schemas.events import DeadLetter
from schemas.settings import Settings
from workers import topics


log = logging.getLogger(__name__)


def read(settings: Settings, timeout_ms: int = 3000) -> Iterator[tuple[int, DeadLetter]]:
    """Every dead letter as ``(offset in the DLQ, letter)``, oldest first. A record that is not a
    dead letter (something else written to the topic) is skipped with a warning naming its offset,
    so it cannot keep the others from being listed or replayed."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=timeout_ms)
    try:
        partitions = consumer.partitions_for_topic(settings.dlq_topic) or set()
        consumer.assign([TopicPartition(settings.dlq_topic, p) for p in sorted(partitions)])
        for record in consumer:
            try:
                letter = DeadLetter.model_validate_json(record.value)
            except ValidationError as exc:
                log.warning("%s[%d]@%d is not a dead letter, skipped: %s", record.topic, record.partition,
                            record.offset, str(exc).splitlines()[0])
                continue
            yield record.offset, letter
    finally:
        consumer.close()


def replay(settings: Settings, offsets: set[int] | None = None) -> int:
    """Publish the original payloads of the dead letters at ``offsets`` (all if None) to their
    source topic, with their keys. Returns how many were sent.

    Raises:
        kafka.errors.KafkaError: a send failed.
    """
    producer = topics.producer(settings.kafka_bootstrap)
    try:
        futures = [producer.send(letter.topic, key=letter.key.encode() if letter.key is not None else None,
                                 value=base64.b64decode(letter.payload))
                   for offset, letter in read(settings) if offsets is None or offset in offsets]
        producer.flush()
        for future in futures:
            future.get(timeout=60)
        return len(futures)
    finally:
        producer.close()
