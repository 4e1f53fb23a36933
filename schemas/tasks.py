"""Celery task names, queue and payloads: the gateway sends these by name, workers run them."""

from __future__ import annotations

from pydantic import BaseModel, Field

QUEUE_VISION = "vision"
TASK_SEARCH = "lookalike.search"


class SearchTask(BaseModel):
    """Payload of ``TASK_SEARCH``; the image bytes wait in Redis (``schemas.jobs.upload_key``)."""

    job_id: str
    k: int = Field(ge=1, le=100)
