"""Re-sending the messages of jobs the broker lost.

kombu's Redis transport takes a message with ``BRPOP`` (which removes it from the queue's list)
and only then records it in the ``unacked`` hash, from where it is restored if its worker dies.
A worker killed (SIGKILL, OOM) between the two, including while the popped message still waits
unread in its socket, loses that message for good: its job would stay ``queued`` until its TTL.
With micro-batching a worker keeps more messages in flight, so this happens more often.

The job store keeps every job's message until a worker starts the job
(:meth:`schemas.jobs.JobStore.create`). Every ``interval_s`` one worker (a Redis lock) takes the
jobs still ``queued`` ``older_than_s`` after their message was sent and looks for their task id
(the job id) in the queue's list and in ``unacked``; a job whose message is in neither is sent
again. A job waiting in a long queue, held in a worker's micro-batch buffer, or held by a dead
worker (kombu restores it after the visibility timeout) is left alone. A message sent twice
anyway (it was between the two places at the instant of the scan) runs its job at most once
more, with the same result; a job that already ended is not run again (JobStore.running).
"""

from __future__ import annotations

import json
import logging
import threading

import redis
from celery import Celery

from schemas.api import JobState
from schemas.jobs import PREFIX, JobStore
from schemas.tasks import QUEUE_VISION
from workers import metrics

log = logging.getLogger(__name__)

# kombu's Redis transport keys (Channel.unacked_key; a queue is a list named after it).
UNACKED_KEY = "unacked"
LOCK_KEY = PREFIX + "sweep-lock"
SWEEP_INTERVAL_S = 5.0


class LostMessageSweeper:
    """Finds queued jobs whose broker message is gone and sends it again (module docstring).

    Args:
        store: The job store (its Redis is also the broker).
        app: The Celery app to send with.
        older_than_s: How long after its message was sent a queued job is looked at; the
            visibility timeout (LOOKALIKE_VISIBILITY_TIMEOUT_S) by default.
        interval_s: Seconds between sweeps (across all workers, by the lock).
    """

    def __init__(self, store: JobStore, app: Celery, older_than_s: float, interval_s: float = SWEEP_INTERVAL_S) -> None:
        self.store, self.app = store, app
        self.older_than_s, self.interval_s = older_than_s, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[str]:
        """One sweep (without the lock). Returns the ids of the jobs whose message was sent again."""
        overdue = self.store.overdue(self.older_than_s)
        if not overdue:
            return []
        held = broker_task_ids(self.store.client)
        resent = []
        for job_id, message in overdue.items():
            if job_id in held:
                continue
            status = self.store.get(job_id)
            if status is None or status.status != JobState.queued:  # expired, or started meanwhile
                self.store.forget_queued(job_id)
                continue
            log.warning("job %s: queued for over %.0f s and its message is in neither queue %r nor %r; "
                        "sending it again", job_id, self.older_than_s, QUEUE_VISION, UNACKED_KEY)
            self.app.send_task(message["task"], args=message["args"], queue=QUEUE_VISION, task_id=job_id)
            self.store.requeued(job_id)
            metrics.MESSAGES_RESENT.inc()
            resent.append(job_id)
        return resent

    def start(self, worker: str) -> None:
        """Sweep every ``interval_s`` in a daemon thread; ``worker`` names the lock's holder."""
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    if self.store.client.set(LOCK_KEY, worker, nx=True, px=int(self.interval_s * 900)):
                        self.sweep()
                except redis.RedisError as exc:  # Redis down: the next sweep tries again
                    log.warning("lost-message sweep skipped: %s", exc)
        self._thread = threading.Thread(target=loop, name="lost-message-sweep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def broker_task_ids(client: redis.Redis) -> set[str]:
    """Task ids of the messages waiting in queue ``vision`` and of those taken but not acknowledged."""
    messages = [json.loads(raw) for raw in client.lrange(QUEUE_VISION, 0, -1)]
    messages += [json.loads(raw)[0] for raw in client.hvals(UNACKED_KEY)]  # [message, exchange, routing key]
    return {m["headers"]["id"] for m in messages if "id" in (m.get("headers") or {})}
