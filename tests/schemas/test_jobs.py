"""The job store on real Redis: a job's first outcome stands."""

from __future__ import annotations

import redis

from schemas.api import Box, JobState, SearchResult
from schemas.jobs import JobStore


def test_a_second_run_of_a_job_cannot_overwrite_its_outcome(settings):
    """A message delivered twice can run twice at once: the run that ends first wins, and the other,
    finding the upload gone, must not turn the job `done` into `failed` (upload_expired)."""
    store = JobStore(redis.Redis.from_url(settings.redis_url), 60)
    store.create("twice", b"photo")
    assert store.running("twice").status == JobState.running
    result = SearchResult(model_version="v", box=Box(x=0, y=0, w=32, h=32), products=[])
    store.done("twice", result, {"embed": 0.01})
    assert store.take_upload("twice") is None  # what the second run finds
    store.failed("twice", "upload_expired", "the upload expired")
    ended = store.get("twice")
    assert ended.status == JobState.done and ended.result == result and ended.error is None
    assert store.running("twice") is None  # and a third delivery does not run it
