"""HTTP bodies of the gateway: job submission, job status and the search result."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class Box(BaseModel):
    """A crop box in pixels of the decoded image."""

    x: int
    y: int
    w: int
    h: int


class ProductHit(BaseModel):
    product_id: int
    score: float = Field(description="Cosine similarity of the L2-normalised embeddings, in [-1, 1].")
    title: str | None
    gender: str | None
    master_category: str | None
    sub_category: str | None
    article_type: str | None
    base_colour: str | None
    image_url: str | None = Field(description="Where the storefront can show the product's photo.")


class SearchResult(BaseModel):
    model_version: str
    box: Box = Field(description="The part of the image that was embedded.")
    products: list[ProductHit]


class JobError(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. `invalid_image`.")
    message: str = Field(description="What was wrong and what to do, for a person.")


class JobAccepted(BaseModel):
    job_id: str
    status_url: str


class JobStatus(BaseModel):
    job_id: str
    status: JobState
    result: SearchResult | None = None
    error: JobError | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    created_at: float = Field(description="Unix time, seconds.")
    updated_at: float


class ErrorBody(BaseModel):
    class Detail(BaseModel):
        code: str
        message: str
        field: str | None = None

    error: Detail
