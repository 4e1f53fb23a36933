"""A vision worker killed with SIGKILL mid-load: the jobs it held are redelivered and finish.

Two workers share queue ``vision`` with a short visibility timeout
(``LOOKALIKE_VISIBILITY_TIMEOUT_S``); one is killed while both run jobs. The jobs it held stay
``running`` until Redis (kombu's restore loop in the surviving worker) hands them back; the test
prints how long that took. No other worker runs during this module.
"""

from __future__ import annotations

import time

import redis

from schemas.api import JobStatus
from schemas.jobs import job_key
from schemas.tasks import QUEUE_VISION, RESTORE_INTERVAL_S
from tests.test_shutdown import start_worker, statuses, submit_jobs

VISIBILITY_TIMEOUT_S = 10


def test_jobs_of_a_worker_killed_mid_load_are_redelivered_and_finish(settings, stack, tmp_path):
    client = redis.Redis.from_url(settings.redis_url)
    client.delete(QUEUE_VISION, "unacked", "unacked_index")  # whatever earlier tests left without a worker
    env = {**stack, "LOOKALIKE_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S)}
    survivor = start_worker(env, tmp_path / "survivor.log")
    victim = start_worker(env, tmp_path / "victim.log")
    try:
        survivor.wait_serving(300)  # the machine is shared: loading can be slow
        victim.wait_serving(300)
        job_ids = submit_jobs(settings, 60)

        deadline = time.monotonic() + 60
        while client.llen(QUEUE_VISION) > 10:  # both workers busy, jobs still waiting
            assert time.monotonic() < deadline, statuses(client, job_ids)
            time.sleep(0.01)
        victim.proc.kill()
        killed_at = time.time()
        victim.proc.wait()

        while client.llen(QUEUE_VISION):  # the survivor takes the rest; the victim's jobs stay as it left them
            assert time.time() < killed_at + VISIBILITY_TIMEOUT_S - 3, "the survivor is too slow to tell them apart"
            time.sleep(0.05)
        time.sleep(1)
        stranded = {job_id: status.updated_at for job_id, status in _read(client, job_ids).items()
                    if status.status.value in ("running", "queued") and status.updated_at < killed_at}
        assert stranded, f"the victim held no job when killed: {statuses(client, job_ids)}"

        redelivered: dict[str, float] = {}
        deadline = time.monotonic() + VISIBILITY_TIMEOUT_S + 60
        while set(statuses(client, job_ids).values()) != {"done"}:
            for job_id, status in _read(client, list(stranded)).items():
                if job_id not in redelivered and status.updated_at != stranded[job_id]:
                    redelivered[job_id] = status.updated_at - killed_at
            assert time.monotonic() < deadline, f"{statuses(client, job_ids)}\n{survivor.log()}"
            time.sleep(0.05)
        for job_id, status in _read(client, list(stranded)).items():
            redelivered.setdefault(job_id, status.updated_at - killed_at)
        print(f"\n{len(stranded)} job(s) held by the killed worker redelivered after "
              f"{', '.join(f'{s:.1f}' for s in sorted(redelivered.values()))} s "
              f"(visibility timeout {VISIBILITY_TIMEOUT_S} s)")
        assert min(redelivered.values()) >= VISIBILITY_TIMEOUT_S - 1  # not before the timeout: no double runs
        assert max(redelivered.values()) < VISIBILITY_TIMEOUT_S + RESTORE_INTERVAL_S + 5  # kombu's default: 100 s
        assert client.llen(QUEUE_VISION) == 0
    finally:
        victim.stop()
        survivor.terminate_and_wait()


def _read(client: redis.Redis, job_ids: list[str]) -> dict[str, JobStatus]:
    return {job_id: JobStatus.model_validate_json(raw)
            for job_id, raw in zip(job_ids, client.mget([job_key(j) for j in job_ids]))}
