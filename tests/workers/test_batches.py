"""The worker's dynamic micro-batching rule (workers.tasks.JobBatches), with a fake pool: fast
unit tests beside tests/test_batching.py, which runs a real Celery worker on Redis."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import workers.tasks as tasks
from workers.tasks import JobBatches


class FakePool:
    """Two threads; holds the batches handed to it until the test runs them."""

    limit = 2

    def __init__(self) -> None:
        self.submitted = []

    def apply_async(self, target, args, accept_callback, callback):
        self.submitted.append((target, args, callback))

    def finish(self, i: int = 0, fail: bool = False) -> None:
        target, args, callback = self.submitted.pop(i)
        if fail:  # celery's apply_target re-raises and skips the callback
            with pytest.raises(RuntimeError):
                target(*args)
            return
        callback(target(*args))


def request(n: int) -> SimpleNamespace:
    acked = []
    return SimpleNamespace(n=n, eta=None, task=SimpleNamespace(acks_late=True),
                           acknowledge=lambda: acked.append(n), acked=acked)


@pytest.fixture
def batches(monkeypatch):
    monkeypatch.setattr(tasks, "worker_settings", lambda: SimpleNamespace(job_batch_size=4, job_batch_wait_ms=5))
    monkeypatch.setattr(tasks.SimpleRequest, "from_request", staticmethod(lambda r: r.n))
    ran = []

    def apply_batches_task(task, args, loglevel, logfile):
        (numbers,) = args
        if "fail" in numbers:
            raise RuntimeError("a signal handler broke")
        ran.append(numbers)

    monkeypatch.setattr(tasks, "apply_batches_task", apply_batches_task)
    b = JobBatches()
    b._pool = FakePool()
    b.ran = ran
    return b


def test_a_job_runs_at_once_while_a_thread_is_idle(batches):
    assert batches.flush_every == 1  # celery-batches flushes on every message
    batches._buffer.put(request(1))
    batches._do_flush()
    assert len(batches._pool.submitted) == 1
    batches._pool.finish()
    assert batches.ran == [[1]] and batches._running == 0


def test_jobs_gather_while_every_thread_is_busy_and_batches_never_exceed_the_size(batches):
    batches.flush([request(i) for i in range(10)])  # e.g. what a freed thread finds after a long wait
    assert [len(args[1][0]) for _, args, _ in batches._pool.submitted] == [4, 4, 2]
    assert batches._busy() and batches.flush_every == 4
    batches._buffer.put(request(10))
    batches._do_flush()
    assert len(batches._pool.submitted) == 3  # gathered, not flushed: both threads are busy
    batches._pool.finish()
    batches._pool.finish()
    assert batches._running == 1 and not batches._busy()
    batches._do_flush()
    assert batches._pool.submitted[-1][1][1][0] == [10]


def test_a_batch_that_breaks_outside_the_task_still_frees_its_thread(batches):
    broken, ok = request("fail"), request(1)
    batches.flush([broken])
    batches.flush([ok])
    assert batches._busy()
    batches._pool.finish(0, fail=True)  # no callback: the message stays unacknowledged (redelivered)
    assert not batches._busy() and broken.acked == []
    batches._pool.finish(0)
    assert ok.acked == [1] and batches._running == 0


def test_fewer_than_four_waiting_jobs_run_one_by_one_and_four_run_together(batches):
    batches.flush([request("a")])
    batches.flush([request("b")])
    assert batches._busy()
    for n in (1, 2, 3):  # arrive while both threads are busy
        batches._buffer.put(request(n))
    batches._pool.finish()  # "a" ends: its thread takes the first and leaves two
    batches._do_flush()
    assert batches._pool.submitted[-1][1][1][0] == [1] and batches._buffer.qsize() == 2
    batches._do_flush()
    assert len(batches._pool.submitted) == 2  # the two left wait for a free thread
    batches._pool.finish()  # "b" ends
    batches._do_flush()
    assert batches._pool.submitted[-1][1][1][0] == [2] and batches._buffer.qsize() == 1
    for n in (4, 5, 6):  # with 4 waiting (the catalog scan is shared) a freed thread takes them all
        batches._buffer.put(request(n))
    batches._pool.finish()
    batches._do_flush()
    assert batches._pool.submitted[-1][1][1][0] == [3, 4, 5, 6] and batches._buffer.qsize() == 0
    batches._pool.finish()
    batches._pool.finish()
    assert batches.ran == [["a"], ["b"], [1], [2], [3, 4, 5, 6]] and batches._running == 0
