"""How settings that depend on the machine are resolved."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from schemas.settings import IndexerSettings, WorkerSettings


def test_a_workers_threads_share_its_cores():
    cores = len(os.sched_getaffinity(0))
    assert WorkerSettings(worker_threads=2).model_threads() == max(1, cores // 2)
    assert WorkerSettings(worker_threads=cores + 1).model_threads() == 1  # never 0, which is torch's default
    assert WorkerSettings(worker_threads=2, torch_threads=3).model_threads() == 3  # a set value wins


def test_the_worker_reads_the_procfiles_thread_count(monkeypatch):
    monkeypatch.setenv("LOOKALIKE_WORKER_THREADS", "4")
    assert WorkerSettings().worker_threads == 4


def test_the_indexer_keeps_torchs_default():
    assert IndexerSettings().model_threads() == 0
    assert IndexerSettings(torch_threads=2).model_threads() == 2


@pytest.mark.parametrize("size", [2, 3])
def test_a_batch_size_that_would_never_batch_is_refused(size):
    """Micro-batches of fewer than 4 jobs are not formed (workers.tasks.JobBatches.flush), so 2 and 3
    would silently mean 1."""
    with pytest.raises(ValidationError, match=f"LOOKALIKE_JOB_BATCH_SIZE {size} would never batch"):
        WorkerSettings(job_batch_size=size)
    assert WorkerSettings(job_batch_size=1).job_batch_size == 1 and WorkerSettings(job_batch_size=4).job_batch_size == 4
