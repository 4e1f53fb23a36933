"""The release step, once per deploy: wait for PostgreSQL, ``alembic upgrade head``, create topics.

Topics (created if missing; an existing one with another partition count is an error,
since shards are partitions):

- ``catalog.products``      the input, key = product id
- ``catalog.vectors``       the index changelog, same partitions, compacted
- ``catalog.products.dlq``  dead letters
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from schemas.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


@retry(retry=retry_if_exception_type(sa.exc.OperationalError), wait=wait_exponential(max=5),
       stop=stop_after_delay(60), reraise=True)
def wait_for_postgres(url: str) -> None:
    """Connect until PostgreSQL answers (60 s at most; the last error is raised)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()


def migrate(url: str) -> None:
    """``alembic upgrade head`` against ``url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


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


def release(settings: Settings) -> None:
    wait_for_postgres(settings.database_url)
    migrate(settings.database_url)
    created = create_topics(settings)
    log.info("release done: database at head, topics created: %s", created or "none (all existed)")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    release(Settings())


if __name__ == "__main__":
    main()
