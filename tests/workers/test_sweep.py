"""The lost-message sweep, on the real Redis broker: only a job whose message is nowhere is re-sent."""

from __future__ import annotations

import base64
import json

import pytest
import redis
from celery import Celery

from schemas.jobs import QUEUED_KEY, QUEUED_MESSAGES_KEY, JobStore, job_key
from schemas.tasks import QUEUE_VISION, TASK_SEARCH, transport_options
from tests.conftest import take_message
from workers.sweep import UNACKED_KEY, LostMessageSweeper


@pytest.fixture()
def broker(settings):
    client = redis.Redis.from_url(settings.redis_url)
    keys = (QUEUE_VISION, UNACKED_KEY, "unacked_index", QUEUED_KEY, QUEUED_MESSAGES_KEY)
    client.delete(*keys)
    app = Celery("test-sweep", broker=settings.redis_url, set_as_current=False)
    app.conf.broker_transport_options = transport_options(10)
    yield client, JobStore(client, 600), app
    client.delete(*keys)


def submit(store: JobStore, app: Celery, job_id: str) -> dict:
    """What the gateway does for a job (gateway/jobs.py enqueue)."""
    payload = {"job_id": job_id, "k": 3}
    store.create(job_id, b"image bytes", (TASK_SEARCH, payload))
    app.send_task(TASK_SEARCH, args=[payload], queue=QUEUE_VISION, task_id=job_id)
    return payload


def queued_messages(client: redis.Redis) -> dict[str, dict]:
    """Task id -> payload of each message in queue ``vision``."""
    out = {}
    for raw in client.lrange(QUEUE_VISION, 0, -1):
        message = json.loads(raw)
        out[message["headers"]["id"]] = json.loads(base64.b64decode(message["body"]))[0][0]
    return out


def test_only_a_message_that_is_nowhere_is_sent_again(broker):
    client, store, app = broker
    payloads = {job_id: submit(store, app, job_id) for job_id in ("lost", "held", "waiting", "started")}
    # What a worker killed mid-BRPOP leaves: "lost" popped and never recorded in unacked.
    # "held": taken by a worker (dead or alive) and recorded, as kombu's QoS.append does.
    take_message(client, "lost"), take_message(client, "started")
    client.hset(UNACKED_KEY, "tag-1", json.dumps([take_message(client, "held"), "vision", "vision"]))
    store.running("started")  # a worker took it and started it: it acks or kombu restores it
    sweeper = LostMessageSweeper(store, app, older_than_s=0)

    assert sweeper.sweep() == ["lost"]
    assert queued_messages(client) == {"waiting": payloads["waiting"], "lost": payloads["lost"]}
    assert store.get("lost").status.value == "queued"

    assert LostMessageSweeper(store, app, older_than_s=60).sweep() == []  # its clock restarted
    take_message(client, "lost")  # lost again
    assert sweeper.sweep() == ["lost"]  # and sent again


def test_jobs_that_started_ended_or_expired_are_forgotten(broker):
    client, store, app = broker
    for job_id in ("started", "failed", "expired"):
        submit(store, app, job_id)
    client.delete(QUEUE_VISION)  # every message lost
    store.running("started")
    store.failed("failed", "internal", "the worker failed")
    client.delete(job_key("expired"))

    assert LostMessageSweeper(store, app, older_than_s=0).sweep() == []
    assert client.llen(QUEUE_VISION) == 0
    assert client.zcard(QUEUED_KEY) == 0 and client.hlen(QUEUED_MESSAGES_KEY) == 0


def test_nothing_is_scanned_while_no_job_is_overdue(broker):
    client, store, app = broker
    submit(store, app, "fresh")
    client.delete(QUEUE_VISION)
    assert LostMessageSweeper(store, app, older_than_s=60).sweep() == []
    assert store.overdue(60) == {} and list(store.overdue(0)) == ["fresh"]
