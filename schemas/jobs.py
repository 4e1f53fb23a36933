"""The job store in Redis: one JSON status per job id, with a TTL, plus the upload bytes.

Keys (``lookalike:`` prefix):

- ``job:{id}``     the :class:`schemas.api.JobStatus` as JSON, expires after ``job_ttl_s``.
- ``upload:{id}``  the uploaded image bytes until a worker takes them, same TTL.
- ``replicas``     hash ``worker id -> ReplicaStatus JSON``: what each worker can search.
- ``rate:{who}:{minute}``  requests of one API key (digest prefix) in one minute, expires after 2.
- ``queued``       sorted set ``job id -> time its message was sent``, of the jobs no worker has
                   started yet, and ``queued-messages``, hash ``job id -> {"task", "args"}``: what
                   :class:`workers.sweep.LostMessageSweeper` re-sends if the broker lost the message.
"""

from __future__ import annotations

import json
import time
import uuid

import redis
from pydantic import BaseModel

from schemas.api import EmbeddingResult, JobError, JobState, JobStatus, SearchResult

PREFIX = "lookalike:"
REPLICAS_KEY = PREFIX + "replicas"
QUEUED_KEY = PREFIX + "queued"
QUEUED_MESSAGES_KEY = PREFIX + "queued-messages"
ENDED = (JobState.done, JobState.failed)


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def upload_key(job_id: str) -> str:
    return f"{PREFIX}upload:{job_id}"


def rate_key(who: str, minute: int) -> str:
    return f"{PREFIX}rate:{who}:{minute}"


def new_job_id() -> str:
    return uuid.uuid4().hex


class ReplicaStatus(BaseModel):
    """What one worker's replicas hold (written by the worker every second or so)."""

    worker: str
    model_version: str
    ntotal: int
    shard_sizes: list[int]
    lag: int | None = None  # changelog records not yet applied (None: not known yet)
    updated_at: float


class JobStore:
    """Reads and writes job status in Redis. Safe to share between threads."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    def create(self, job_id: str, image: bytes | None, message: tuple[str, dict] | None = None) -> JobStatus:
        """Store the upload (if the job has one) and a ``queued`` status atomically.

        Args:
            message: The Celery task name and payload the job is sent as; kept until a worker
                starts the job, so that it can be sent again if the broker loses it (see
                :meth:`overdue`). None: not kept.
        """
        now = time.time()
        status = JobStatus(job_id=job_id, status=JobState.queued, created_at=now, updated_at=now)
        with self.client.pipeline(transaction=True) as pipe:
            if image is not None:
                pipe.set(upload_key(job_id), image, ex=self.ttl_s)
            pipe.set(job_key(job_id), status.model_dump_json(), ex=self.ttl_s)
            if message is not None:
                pipe.zadd(QUEUED_KEY, {job_id: now})
                pipe.hset(QUEUED_MESSAGES_KEY, job_id, json.dumps({"task": message[0], "args": [message[1]]}))
            pipe.execute()
        return status

    def get(self, job_id: str) -> JobStatus | None:
        raw = self.client.get(job_key(job_id))
        return None if raw is None else JobStatus.model_validate_json(raw)

    def take_upload(self, job_id: str) -> bytes | None:
        """The upload's bytes (they stay until the job ends), or None if expired."""
        return self.client.get(upload_key(job_id))

    def _update(self, job_id: str, **changes) -> JobStatus:
        current = self.get(job_id)
        if current is None:  # expired or never existed: keep a record of the outcome anyway
            current = JobStatus(job_id=job_id, status=JobState.queued, created_at=time.time(), updated_at=0)
        if current.status in ENDED and changes.get("status") in ENDED:
            return current  # the first outcome stands: a second run of a message delivered twice ends after it
        status = current.model_copy(update={**changes, "updated_at": time.time()})
        self.client.set(job_key(job_id), status.model_dump_json(), ex=self.ttl_s)
        return status

    def running(self, job_id: str) -> JobStatus | None:
        """Mark the job running; None, changing nothing, if it already ended: a message delivered
        again after its job finished (the worker was killed between writing the result and
        acknowledging the message) must not run it a second time."""
        current = self.get(job_id)
        self.forget_queued(job_id)
        if current is not None and current.status in ENDED:
            return None
        return self._update(job_id, status=JobState.running)

    def done(self, job_id: str, result: SearchResult | EmbeddingResult, timings: dict[str, float]) -> JobStatus:
        status = self._update(job_id, status=JobState.done, result=result, timings=timings)
        self.client.delete(upload_key(job_id))
        return status

    def failed(self, job_id: str, code: str, message: str, timings: dict[str, float] | None = None) -> JobStatus:
        status = self._update(job_id, status=JobState.failed, error=JobError(code=code, message=message),
                              timings=timings or {})
        self.client.delete(upload_key(job_id))
        self.forget_queued(job_id)
        return status

    def overdue(self, older_than_s: float) -> dict[str, dict]:
        """Jobs no worker has started whose message was sent more than ``older_than_s`` seconds
        ago: ``{job id: {"task": name, "args": [payload]}}``. Most are simply waiting in the queue."""
        job_ids = [j.decode() for j in self.client.zrangebyscore(QUEUED_KEY, 0, time.time() - older_than_s)]
        if not job_ids:
            return {}
        messages = self.client.hmget(QUEUED_MESSAGES_KEY, job_ids)
        return {job_id: json.loads(m) for job_id, m in zip(job_ids, messages) if m is not None}

    def requeued(self, job_id: str) -> None:
        """The job's message was sent again: it is overdue ``older_than_s`` from now, not before."""
        self.client.zadd(QUEUED_KEY, {job_id: time.time()}, xx=True)

    def forget_queued(self, job_id: str) -> None:
        """Stop watching the job's message (a worker started the job, or it ended or expired)."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(QUEUED_KEY, job_id)
            pipe.hdel(QUEUED_MESSAGES_KEY, job_id)
            pipe.execute()

    def replicas(self, max_age_s: float = 10.0) -> list[ReplicaStatus]:
        """Replica reports of workers seen in the last ``max_age_s`` seconds."""
        now = time.time()
        reports = [ReplicaStatus.model_validate_json(v) for v in self.client.hvals(REPLICAS_KEY)]
        return [r for r in reports if now - r.updated_at <= max_age_s]

    def report_replica(self, status: ReplicaStatus) -> None:
        self.client.hset(REPLICAS_KEY, status.worker, status.model_dump_json())
