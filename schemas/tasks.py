"""Celery task names, queue and payloads: the gateway sends these by name, workers run them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from schemas.api import MAX_EXCLUDE_IDS, MAX_K, MAX_URL_CHARS, Box, Category, Filters, ProductId

QUEUE_VISION = "vision"
TASK_SEARCH = "lookalike.search"
TASK_EMBED = "lookalike.embed"
RESTORE_INTERVAL_S = 2  # how often a worker looks for jobs whose worker died (one ZRANGE on Redis)


def transport_options(visibility_timeout_s: int, **more) -> dict:
    """kombu Redis transport options shared by the gateway and the workers.

    A job a worker took but never acknowledged (the worker was killed) goes back to the queue
    ``visibility_timeout_s`` after it was taken, once a worker's restore sweep sees it. kombu's
    default sweep runs every 10 s but scans only every 10th time (100 s); here every sweep
    scans, every ``RESTORE_INTERVAL_S``, and a worker killed mid-sweep blocks the others' sweeps
    for at most the visibility timeout, not 5 minutes.
    """
    return {"visibility_timeout": visibility_timeout_s, "unacked_restore_interval": RESTORE_INTERVAL_S,
            "unacked_restore_throttle": 1, "unacked_mutex_expire": visibility_timeout_s, **more}


class SearchTask(BaseModel):
    """Payload of ``TASK_SEARCH``. The query is one of: the upload waiting in Redis
    (``schemas.jobs.upload_key``, the default), ``image_url`` (the worker fetches it) or
    ``product_id`` (the product's stored vector, "more like this"; the product is excluded)."""

    job_id: str
    k: int = Field(ge=1, le=MAX_K)
    image_url: str | None = Field(None, max_length=MAX_URL_CHARS)
    product_id: ProductId | None = None
    crop: Box | None = None
    filters: Filters | None = None
    category: Literal["auto"] | Category | None = None  # auto: the worker's predicted category
    exclude_ids: list[ProductId] = Field(default_factory=list, max_length=MAX_EXCLUDE_IDS + 1)

    @model_validator(mode="after")
    def _one_query(self) -> SearchTask:
        if self.image_url is not None and self.product_id is not None:
            raise ValueError("a search task takes image_url or product_id, not both")
        if self.product_id is not None and self.crop is not None:
            raise ValueError("a search by product_id has no image to crop")
        return self


class EmbedTask(BaseModel):
    """Payload of ``TASK_EMBED``: the vector of the upload waiting in Redis, or of ``image_url``."""

    job_id: str
    image_url: str | None = Field(None, max_length=MAX_URL_CHARS)
    crop: Box | None = None
