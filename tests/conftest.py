"""Shared fixtures: real PostgreSQL, Redis and a Kafka-protocol broker.

PostgreSQL and Redis are the machine's (``LOOKALIKE_TEST_DATABASE_URL``, default the
``test`` database on 127.0.0.1:5432; ``LOOKALIKE_TEST_REDIS_URL``, default db 15 on
127.0.0.1:6379) when they answer, else embedded ones from ``ops.stack``; the broker is
always an embedded Tansu, fresh per test session. The database schema is dropped and
migrated at the start of the session.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from ops.release import release
from ops.stack import LocalStack
from schemas.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "ops" / "sample"
TEST_DATABASE_URL = os.environ.get("LOOKALIKE_TEST_DATABASE_URL",
                                   "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
TEST_REDIS_URL = os.environ.get("LOOKALIKE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _answers(check) -> bool:
    with contextlib.suppress(Exception):
        check()
        return True
    return False


def _pg_check() -> None:
    engine = sa.create_engine(TEST_DATABASE_URL, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> dict[str, str]:
    """``LOOKALIKE_*`` URLs of real services for this test session."""
    env = {}
    if _answers(_pg_check):
        env["LOOKALIKE_DATABASE_URL"] = TEST_DATABASE_URL
    if _answers(lambda: redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=2).ping()):
        env["LOOKALIKE_REDIS_URL"] = TEST_REDIS_URL
    with LocalStack(tmp_path_factory.mktemp("stack"), env=env) as local:
        yield local.environ()


@pytest.fixture(scope="session")
def settings(stack) -> Settings:
    """Settings pointing at the test services, after a clean schema and the release step."""
    settings = Settings(database_url=stack["LOOKALIKE_DATABASE_URL"], redis_url=stack["LOOKALIKE_REDIS_URL"],
                        kafka_bootstrap=stack["LOOKALIKE_KAFKA_BOOTSTRAP"])
    engine = sa.create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS product_vectors, products, alembic_version CASCADE"))
    engine.dispose()
    redis.Redis.from_url(settings.redis_url).flushdb()
    release(settings)
    return settings


@pytest.fixture(scope="session")
def engine(settings) -> sa.Engine:
    engine = sa.create_engine(settings.database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def embedder():
    from workers.embed import Embedder

    model = Embedder("test-model", device="cpu")
    model.load()
    return model
