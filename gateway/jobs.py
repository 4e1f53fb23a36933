"""Search and embedding jobs: ``POST /v1/jobs``, ``POST /v1/embeddings`` and ``GET /v1/jobs/{id}``.

A job's photo (multipart file, base64 or URL) and options are validated here; the upload is
stored in Redis and the task sent by name to queue ``vision`` (unless the queue is full); the
worker writes the outcome back to Redis, which ``wait_s`` long-polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import kombu.exceptions
import redis
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway import metrics
from gateway.errors import ApiError
from gateway.options import from_form as options_from_form
from gateway.options import from_json as options_from_json
from gateway.uploads import check_image
from schemas.api import EmbeddingRequest, ImageInput, JobAccepted, JobRequest, JobState, JobStatus, SearchOptions
from schemas.jobs import job_key, new_job_id
from schemas.settings import GatewaySettings
from schemas.tasks import QUEUE_VISION, TASK_EMBED, TASK_SEARCH, EmbedTask, SearchTask

# Room for the options besides the photo: the largest filters the schema allows (7 lists of 100
# values of 200 characters), the multipart boundaries; also the most one form part may hold.
FORM_OVERHEAD_BYTES = 1024 * 1024
POLL_FIRST_S, POLL_MAX_S = 0.02, 0.25  # long-poll: first and longest pause between reads of a job


async def submit_job(request: Request) -> JSONResponse:
    """``POST /v1/jobs``: multipart (file ``image`` and option fields) or JSON (``image_base64`` or
    ``image_url``, and options); see :class:`schemas.api.JobRequest`."""
    settings = request.state.settings
    data, options = await _read_photo(request, JobRequest)
    task = SearchTask(job_id=new_job_id(), k=options.k or settings.default_k, image_url=options.image_url,
                      crop=options.crop, filters=options.filters, category=options.category,
                      exclude_ids=options.exclude_ids)
    return await _accept(request, TASK_SEARCH, task, data)


async def submit_embedding(request: Request) -> JSONResponse:
    """``POST /v1/embeddings``: the vector of a photo (multipart ``image`` and ``crop``, or JSON
    ``image_base64`` or ``image_url`` and ``crop``), as a job like a search."""
    data, request_body = await _read_photo(request, EmbeddingRequest)
    task = EmbedTask(job_id=new_job_id(), image_url=request_body.image_url, crop=request_body.crop)
    return await _accept(request, TASK_EMBED, task, data)


async def _read_photo(request: Request, model: type[ImageInput]) -> tuple[bytes | None, ImageInput]:
    """The photo's bytes (None when it is a URL) and the request as ``model``, from multipart or JSON.

    Raises:
        ApiError: 413, 415, 400 or 422 naming the field, before anything is stored.
    """
    settings = request.state.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        _check_length(request, settings.max_upload_bytes + FORM_OVERHEAD_BYTES)
        shared = set(model.model_fields) & set(SearchOptions.model_fields)  # e.g. only crop for embeddings
        data, options = await _read_form(request, settings, shared)
        parsed = model.model_construct(**{name: getattr(options, name) for name in shared},
                                       image_base64=None, image_url=None)
    elif content_type == "application/json":
        limit = _base64_length(settings.max_upload_bytes) + FORM_OVERHEAD_BYTES
        _check_length(request, limit)
        parsed, data = options_from_json(await read_body(request, limit), model)
    else:
        raise ApiError(415, "not_multipart", "send the photo as multipart/form-data with a file field `image`, "
                       "or as application/json with `image_base64` or `image_url`")
    if data is not None:
        try:
            check_image(data, settings.max_upload_bytes, settings.max_pixels)
        except ApiError as exc:
            metrics.UPLOADS_REJECTED.labels(exc.code).inc()
            if exc.field == "image" and content_type == "application/json":
                exc.field = "image_base64"
            raise
    return data, parsed


async def _accept(request: Request, task_name: str, task: SearchTask | EmbedTask, data: bytes | None
                  ) -> JSONResponse:
    await enqueue(request, task_name, task, data)
    status_url = str(request.url_for("job_status", job_id=task.job_id))
    body = JobAccepted(job_id=task.job_id, status_url=status_url)
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": status_url})


async def _read_form(request: Request, settings: GatewaySettings, fields: set[str]) -> tuple[bytes, SearchOptions]:
    """The photo and the options of a multipart body whose text fields may be ``fields``.

    Raises:
        ApiError: 422 a field that is not one of ``fields`` (as an unknown JSON key is), or no ``image``.
    """
    async with request.form(max_files=1, max_fields=8, max_part_size=FORM_OVERHEAD_BYTES) as form:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "missing_image", "the form needs a file field `image` with the photo", "image")
        for name in form.keys():
            if name != "image" and name not in fields:
                raise ApiError(422, f"invalid_{name}", f"{name}: not a field of this request; the form takes "
                               f"`image` and {', '.join(f'`{f}`' for f in sorted(fields))}", name)
        data = await upload.read(settings.max_upload_bytes + 1)
        options = options_from_form(form, _parse_k(form.get("k"), settings.default_k))
    return data, options


def _check_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        settings = request.state.settings
        raise ApiError(413, "too_large", f"the request is {length} bytes, more than the "
                       f"{settings.max_upload_bytes}-byte upload limit (LOOKALIKE_MAX_UPLOAD_BYTES) and "
                       f"{FORM_OVERHEAD_BYTES} bytes of options allow", "image")


def _base64_length(n_bytes: int) -> int:
    return (n_bytes + 2) // 3 * 4


async def read_body(request: Request, limit: int, why: str | None = None, field: str | None = "image_base64"
                    ) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (whatever Content-Length said)."""
    why = why or (f"the image may be at most {request.state.settings.max_upload_bytes} bytes "
                  "(LOOKALIKE_MAX_UPLOAD_BYTES), which is larger in base64")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "too_large", f"the body is more than {limit} bytes; {why}", field)
    return bytes(body)


async def enqueue(request: Request, task_name: str, task: SearchTask | EmbedTask, data: bytes | None) -> None:
    """Store the job (and its upload, if any) and send ``task_name`` to queue ``vision`` (task id =
    job id), unless the queue is already ``max_queue_depth`` long (503 + Retry-After). The job store
    keeps the message until a worker starts the job, in case the broker loses it (workers/sweep.py)."""
    state = request.state
    await _check_queue_depth(request)
    try:
        payload = task.model_dump(mode="json")
        await run_in_threadpool(state.store.create, task.job_id, data, (task_name, payload))
        await run_in_threadpool(state.celery.send_task, task_name, args=[payload], queue=QUEUE_VISION,
                                task_id=task.job_id)
    except (redis.RedisError, OSError, kombu.exceptions.OperationalError) as exc:
        # Stored but not sent (Redis went away in between): the caller never learns the job's id,
        # so the lost-message sweep must not send it later either.
        with contextlib.suppress(redis.RedisError):
            await run_in_threadpool(state.store.forget_queued, task.job_id)
        raise ApiError(503, "unavailable", f"the job queue is unavailable ({type(exc).__name__}); retry shortly",
                       headers={"Retry-After": "5"}) from None
    metrics.JOBS_SUBMITTED.inc()


async def _check_queue_depth(request: Request) -> None:
    """Refuse new work while the ``vision`` queue is full.

    The depth is ``LLEN vision``: kombu's Redis transport keeps a queue's waiting messages in a
    list named after the queue (messages a worker has taken but not acked are not counted).
    """
    settings = request.state.settings
    if not settings.max_queue_depth:
        return
    try:
        depth = await request.state.aredis.llen(QUEUE_VISION)
    except redis.RedisError as exc:
        raise ApiError(503, "unavailable", f"the job queue is unavailable ({type(exc).__name__}); retry shortly",
                       headers={"Retry-After": "5"}) from None
    if depth >= settings.max_queue_depth:
        metrics.REQUESTS_REFUSED.labels("queue_full").inc()
        retry_after = str(settings.queue_retry_after_s)
        raise ApiError(503, "overloaded", f"{depth} jobs are waiting, the limit is {settings.max_queue_depth} "
                       f"(LOOKALIKE_MAX_QUEUE_DEPTH); retry after {retry_after} s",
                       headers={"Retry-After": retry_after})


def _parse_k(raw: object, default: int) -> int:
    if raw is None or raw == "":
        return default
    text = raw.strip() if isinstance(raw, str) else ""
    if not (text.isascii() and text.isdigit() and len(text) <= 3 and 1 <= int(text) <= 100):
        raise ApiError(422, "invalid_k", f"k must be an integer from 1 to 100, got {str(raw)[:80]!r}", "k")
    return int(text)


def parse_wait_s(request: Request, default: float) -> float:
    raw = request.query_params.get("wait_s")
    limit = request.state.settings.max_wait_s
    if raw is None:
        return min(default, limit)
    try:
        wait_s = float(raw)
    except ValueError:
        wait_s = -1.0
    if not 0 <= wait_s <= limit:  # also refuses nan
        raise ApiError(422, "invalid_wait_s", f"wait_s must be a number of seconds from 0 to {limit:g} "
                       f"(LOOKALIKE_MAX_WAIT_S), got {raw!r}", "wait_s")
    return wait_s


async def wait_for(request: Request, job_id: str, wait_s: float) -> JobStatus | None:
    """The job's status once it is done or failed, or as it is after ``wait_s`` seconds.

    Reads the status with the asyncio Redis client (one GET per read, so the event loop is never
    blocked), pausing 20 ms at first and doubling up to 250 ms between reads.
    """
    deadline = time.monotonic() + wait_s
    pause = POLL_FIRST_S
    try:
        while True:
            raw = await request.state.aredis.get(job_key(job_id))
            status = None if raw is None else JobStatus.model_validate_json(raw)
            left = deadline - time.monotonic()
            if status is None or status.status in (JobState.done, JobState.failed) or left <= 0:
                return status
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, POLL_MAX_S)
    except redis.RedisError as exc:
        raise ApiError(503, "unavailable", f"the job store is unavailable ({type(exc).__name__})",
                       headers={"Retry-After": "5"}) from None


async def job_status(request: Request) -> JSONResponse:
    """``GET /v1/jobs/{job_id}?wait_s=``: queued, running, done with the result, or failed with the
    reason; with ``wait_s`` it answers as soon as the job ends, or after ``wait_s`` seconds."""
    job_id = request.path_params["job_id"]
    status = await wait_for(request, job_id, parse_wait_s(request, 0.0))
    if status is None:
        raise ApiError(404, "unknown_job", f"no job {job_id!r}: it never existed or expired "
                       f"(jobs are kept {request.state.settings.job_ttl_s} s)")
    return JSONResponse(status.model_dump(mode="json"))
