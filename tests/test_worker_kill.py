"""A vision worker killed with SIGKILL mid-load: the jobs it held are redelivered and finish.

Two workers share queue ``vision`` with a short visibility timeout
(``LOOKALIKE_VISIBILITY_TIMEOUT_S``); one is killed while it runs jobs and more wait. The jobs it
held stay ``running`` (or ``queued``, in its micro-batch buffer) until Redis (kombu's restore loop
in the surviving worker) hands them back; a message it had popped but not yet recorded as unacked
is sent again by the lost-message sweep (workers/sweep.py). The test prints how long each took. No
other worker runs during this module.
"""

from __future__ import annotations

import time
import uuid

import httpx
import redis
from celery import Celery

from ops.bench_embed import set_consuming, worker_nodes
from schemas.api import JobStatus
from schemas.jobs import job_key
from schemas.tasks import QUEUE_VISION, RESTORE_INTERVAL_S
from tests.conftest import drop_queued_jobs, take_message
from tests.test_shutdown import start_worker, statuses, submit_jobs
from workers.sweep import SWEEP_INTERVAL_S, UNACKED_KEY, broker_task_ids

VISIBILITY_TIMEOUT_S = 10


def test_jobs_of_a_worker_killed_mid_load_are_redelivered_and_finish(settings, stack, tmp_path):
    client = redis.Redis.from_url(settings.redis_url)
    drop_queued_jobs(client)  # whatever earlier tests left without a worker
    env = {**stack, "LOOKALIKE_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S)}
    tag = uuid.uuid4().hex[:6]
    survivor = start_worker(env, tmp_path / "survivor.log", f"survivor-{tag}")
    victim = start_worker(env, tmp_path / "victim.log", f"victim-{tag}")
    try:
        survivor.wait_serving(300)  # the machine is shared: loading can be slow
        victim.wait_serving(300)
        # The jobs are queued while neither consumes, and the victim starts first: killed once it runs a
        # batch, it holds that batch and a full prefetch, with jobs still waiting. (Both consuming queued
        # jobs from the start, the survivor, loaded first, once took all but the victim's last few, which
        # were done when it was killed.)
        control = Celery("kill-test", broker=settings.redis_url, set_as_current=False).control
        nodes = worker_nodes(control, {"survivor": f"survivor-{tag}@", "victim": f"victim-{tag}@"})
        for node in nodes.values():
            set_consuming(control, node, False)
        job_ids = submit_jobs(settings, 60)
        set_consuming(control, nodes["victim"], True)
        while not victim.metric("lookalike_worker_batch_jobs_count"):
            time.sleep(0.01)
        set_consuming(control, nodes["survivor"], True)
        assert client.llen(QUEUE_VISION), f"the victim took every job: {statuses(client, job_ids)}"
        victim.proc.kill()
        killed_at = time.time()
        victim.proc.wait()

        # The survivor takes the rest and runs what it took; the victim's jobs stay as it left them.
        done, settled_at = -1, time.monotonic()
        while client.llen(QUEUE_VISION) or time.monotonic() - settled_at < 1:  # no job finished for a second
            assert time.time() < killed_at + VISIBILITY_TIMEOUT_S - 2, "the survivor is too slow to tell them apart"
            now_done = list(statuses(client, job_ids).values()).count("done")
            if now_done != done:
                done, settled_at = now_done, time.monotonic()
            time.sleep(0.05)
        stranded = {job_id: status.updated_at for job_id, status in _read(client, job_ids).items()
                    if status.status.value in ("running", "queued") and status.updated_at < killed_at}
        assert stranded, f"the victim held no job when killed: {statuses(client, job_ids)}"
        # A message the victim had popped but not yet recorded as unacked is lost to the broker;
        # the lost-message sweep (workers/sweep.py) sends it again.
        lost = set(stranded) - broker_task_ids(client)

        # Until every job is done. The machine may be slow, so what fails the test is a stall: no
        # job finishing for longer than the redelivery itself may take, plus a margin.
        redelivered: dict[str, float] = {}
        done, progress_at = 0, time.monotonic()
        while done < len(job_ids):
            for job_id, status in _read(client, list(stranded)).items():
                if job_id not in redelivered and status.updated_at != stranded[job_id]:
                    redelivered[job_id] = status.updated_at - killed_at
            now_done = list(statuses(client, job_ids).values()).count("done")
            if now_done > done:
                done, progress_at = now_done, time.monotonic()
            stalled = time.monotonic() - progress_at
            assert stalled < VISIBILITY_TIMEOUT_S + RESTORE_INTERVAL_S + 30, (
                f"no job finished for {stalled:.0f} s: {statuses(client, job_ids)}\n"
                f"survivor's metrics: {_worker_metrics(survivor)}\n{_broker_state(client)}\n{survivor.log()}")
            time.sleep(0.05)
        for job_id, status in _read(client, list(stranded)).items():
            redelivered.setdefault(job_id, status.updated_at - killed_at)
        held = {job_id: t for job_id, t in redelivered.items() if job_id not in lost}
        print(f"\n{len(held)} job(s) held by the killed worker redelivered after "
              f"{', '.join(f'{s:.1f}' for s in sorted(held.values()))} s "
              f"(visibility timeout {VISIBILITY_TIMEOUT_S} s); "
              f"{len(lost)} lost in flight, sent again by the sweep after "
              f"{', '.join(f'{redelivered[j]:.1f}' for j in lost) or '-'} s")
        if held:
            assert min(held.values()) >= VISIBILITY_TIMEOUT_S - 1  # not before the timeout: no double runs
            assert max(held.values()) < VISIBILITY_TIMEOUT_S + RESTORE_INTERVAL_S + 5  # kombu's default: 100 s
        for job_id in lost:  # sent again once overdue (sent before the kill), at the next sweep
            assert redelivered[job_id] < VISIBILITY_TIMEOUT_S + SWEEP_INTERVAL_S + 5
        assert client.llen(QUEUE_VISION) == 0
    finally:
        victim.stop()
        survivor.terminate_and_wait()


def test_a_job_whose_message_the_broker_lost_is_sent_again_and_finishes(settings, stack, tmp_path):
    client = redis.Redis.from_url(settings.redis_url)
    drop_queued_jobs(client)
    job_ids = submit_jobs(settings, 3)
    take_message(client, job_ids[1])  # what a worker killed between BRPOP and recording it as unacked loses
    worker = start_worker({**stack, "LOOKALIKE_VISIBILITY_TIMEOUT_S": "5"}, tmp_path / "worker.log")
    try:
        worker.wait_serving(300)
        deadline = time.monotonic() + 60
        while set(statuses(client, job_ids).values()) != {"done"}:
            assert time.monotonic() < deadline, f"{statuses(client, job_ids)}\n{worker.log()}"
            time.sleep(0.1)
        assert f"job {job_ids[1]}: queued for over 5 s" in worker.log()
        assert "lookalike_worker_messages_resent_total 1.0" in _worker_metrics(worker)
    finally:
        worker.terminate_and_wait()


def _worker_metrics(worker) -> str:
    try:
        text = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).text
    except httpx.HTTPError as exc:
        return f"unreadable ({exc})"
    return " ".join(line for line in text.splitlines()
                    if line.startswith(("lookalike_worker_batch_jobs_", "lookalike_worker_jobs_total",
                                        "lookalike_worker_messages_resent_total")))


def _broker_state(client: redis.Redis) -> str:
    return (f"{client.llen(QUEUE_VISION)} message(s) in queue {QUEUE_VISION}, {client.hlen(UNACKED_KEY)} unacked; "
            f"their task ids: {sorted(broker_task_ids(client))}")


def _read(client: redis.Redis, job_ids: list[str]) -> dict[str, JobStatus]:
    return {job_id: JobStatus.model_validate_json(raw)
            for job_id, raw in zip(job_ids, client.mget([job_key(j) for j in job_ids]))}
