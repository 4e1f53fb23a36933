"""The release step, once per deploy: wait for PostgreSQL, ``alembic upgrade head``, create
the topics (:func:`workers.topics.create_topics`)."""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from schemas.settings import Settings
from workers.topics import create_topics

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
