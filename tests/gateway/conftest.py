"""Fixtures of the gateway tests: an app on the real test Redis, PostgreSQL and broker, with no
worker, so queued tasks can be read back from the ``vision`` list."""

from __future__ import annotations

import base64
import json

import pytest
import redis
from starlette.testclient import TestClient

from gateway.app import create_app
from schemas.settings import GatewaySettings
from schemas.tasks import QUEUE_VISION, TASK_SEARCH, SearchTask
from tests.conftest import drop_queued_jobs


@pytest.fixture
def gsettings(settings) -> GatewaySettings:
    return GatewaySettings(**{**settings.model_dump(), "max_upload_bytes": 4096, "max_wait_s": 3})


@pytest.fixture
def rclient(gsettings):
    client = redis.Redis.from_url(gsettings.redis_url)
    drop_queued_jobs(client)
    yield client
    drop_queued_jobs(client)
    client.close()


@pytest.fixture
def client(gsettings, rclient):
    with TestClient(create_app(gsettings)) as client:
        yield client


def queued_task(rclient) -> SearchTask:
    """The one task waiting in the ``vision`` queue (kombu's JSON envelope, Celery protocol 2)."""
    assert rclient.llen(QUEUE_VISION) == 1
    message = json.loads(rclient.lpop(QUEUE_VISION))
    assert message["headers"]["task"] == TASK_SEARCH
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return SearchTask.model_validate(args[0])
