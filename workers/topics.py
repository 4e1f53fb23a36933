"""The catalog topics and how to write to them.

Topics are created where missing (by the release step, and by the indexer when a
broker comes back without them). An existing topic with another partition count is an error,
since shards are partitions:

- ``catalog.products``      the input, key = product id
- ``catalog.vectors``       the index changelog, same partitions, compacted
- ``catalog.products.dlq``  dead letters
"""

from __future__ import annotations

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from schemas.settings import Settings


@retry(retry=retry_if_exception_type(KafkaError), wait=wait_exponential(max=5), stop=stop_after_delay(60),
       reraise=True)
def create_topics(settings: Settings) -> list[str]:
    """Create the catalog topics that are missing. Returns the names created.

    Raises:
        RuntimeError: a topic exists with a partition count other than LOOKALIKE_PARTITIONS.
    """
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="lookalike-release")
    try:
        wanted = {
            settings.products_topic: NewTopic(settings.products_topic, settings.partitions, 1),
            settings.vectors_topic: NewTopic(settings.vectors_topic, settings.partitions, 1,
                                             topic_configs={"cleanup.policy": "compact"}),
            settings.dlq_topic: NewTopic(settings.dlq_topic, 1, 1),
        }
        existing = set(admin.list_topics())
        created = []
        for name, topic in wanted.items():
            if name in existing:
                continue
            try:
                admin.create_topics([topic])
                created.append(name)
            except TopicAlreadyExistsError:  # another release won the race
                pass
        for name in (settings.products_topic, settings.vectors_topic):
            described = admin.describe_topics([name])[0]
            count = len(described["partitions"])
            if count != settings.partitions:
                raise RuntimeError(f"topic {name} has {count} partitions but LOOKALIKE_PARTITIONS is "
                                   f"{settings.partitions}; shards are partitions, so set it to {count}")
        return created
    finally:
        admin.close()


def producer(bootstrap: str) -> KafkaProducer:
    """A producer that waits for every replica's acknowledgement (``acks=all``).

    Broker-side idempotence is off: every write is idempotent by product id and version
    already, and an idempotent producer cannot recover when the broker loses its state
    (InitProducerId fails for good after a memory broker restarts).
    """
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, enable_idempotence=False,
                         max_request_size=8 * 1024 * 1024)
