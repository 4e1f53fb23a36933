"""The HTTP gateway: accepts search jobs, answers their status, and reports health.

It stores the upload in Redis, sends ``lookalike.search`` by name to queue ``vision``
and returns ``202 {job_id, status_url}``; workers write the outcome back to Redis.
It never imports torch or faiss.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import redis
import sqlalchemy as sa
from celery import Celery
from kafka import KafkaAdminClient
from kafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import metrics
from gateway.errors import ApiError, handle_api_error
from gateway.uploads import check_image
from schemas.api import JobAccepted
from schemas.jobs import JobStore, new_job_id
from schemas.settings import GatewaySettings
from schemas.tables import products
from schemas.tasks import QUEUE_VISION, TASK_SEARCH, SearchTask

FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and small fields around the file


async def submit_job(request: Request) -> JSONResponse:
    """``POST /v1/jobs``: multipart ``image`` (file) and optional ``k`` (1..100)."""
    state, settings = request.state, request.state.settings
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes + FORM_OVERHEAD_BYTES:
        raise ApiError(413, "too_large", f"the request is {length} bytes, more than the "
                       f"{settings.max_upload_bytes}-byte upload limit (LOOKALIKE_MAX_UPLOAD_BYTES)", "image")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "not_multipart", "send the photo as multipart/form-data with a file field `image`")
    async with request.form(max_files=1, max_fields=8, max_part_size=64 * 1024) as form:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "missing_image", "the form needs a file field `image` with the photo", "image")
        data = await upload.read(settings.max_upload_bytes + 1)
        k = _parse_k(form.get("k"), settings.default_k)
    try:
        check_image(data, settings.max_upload_bytes, settings.max_pixels)
    except ApiError as exc:
        metrics.UPLOADS_REJECTED.labels(exc.code).inc()
        raise
    job_id = new_job_id()
    try:
        await run_in_threadpool(state.store.create, job_id, data)
        await run_in_threadpool(state.celery.send_task, TASK_SEARCH,
                                args=[SearchTask(job_id=job_id, k=k).model_dump()], queue=QUEUE_VISION)
    except (redis.RedisError, OSError) as exc:
        raise ApiError(503, "unavailable", f"the job queue is unavailable ({type(exc).__name__}); retry shortly",
                       headers={"Retry-After": "5"}) from None
    metrics.JOBS_SUBMITTED.inc()
    status_url = str(request.url_for("job_status", job_id=job_id))
    body = JobAccepted(job_id=job_id, status_url=status_url)
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": status_url})


def _parse_k(raw: object, default: int) -> int:
    if raw is None or raw == "":
        return default
    if not isinstance(raw, str) or not raw.strip().isdigit() or not 1 <= int(raw) <= 100:
        raise ApiError(422, "invalid_k", f"k must be an integer from 1 to 100, got {raw!r}", "k")
    return int(raw)


async def job_status(request: Request) -> JSONResponse:
    """``GET /v1/jobs/{job_id}``: queued, running, done with the result, or failed with the reason."""
    job_id = request.path_params["job_id"]
    try:
        status = await run_in_threadpool(request.state.store.get, job_id)
    except redis.RedisError as exc:
        raise ApiError(503, "unavailable", f"the job store is unavailable ({type(exc).__name__})",
                       headers={"Retry-After": "5"}) from None
    if status is None:
        raise ApiError(404, "unknown_job", f"no job {job_id!r}: it never existed or expired "
                       f"(jobs are kept {request.state.settings.job_ttl_s} s)")
    return JSONResponse(status.model_dump(mode="json"))


async def product_image(request: Request) -> Response:
    """``GET /v1/products/{product_id}/image``: the stored JPEG thumbnail."""
    product_id = request.path_params["product_id"]
    query = sa.select(products.c.thumbnail).where(products.c.id == product_id, products.c.deleted.is_(False))

    def fetch() -> bytes | None:
        with request.state.engine.connect() as conn:
            return conn.execute(query).scalar_one_or_none()

    thumbnail = await run_in_threadpool(fetch)
    if thumbnail is None:
        raise ApiError(404, "unknown_product", f"no product {product_id} with an image")
    return Response(thumbnail, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=300"})


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """Ready when Postgres, Redis and the Kafka broker answer (and the catalog topic exists)."""
    state = request.state
    checks = {
        "postgres": await run_in_threadpool(_check_postgres, state.engine),
        "redis": await run_in_threadpool(_check_redis, state.redis),
        "kafka": await run_in_threadpool(_check_kafka, state.settings),
    }
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


def _check_postgres(engine: sa.Engine) -> str:
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return "ok"
    except sa.exc.SQLAlchemyError as exc:
        return f"unreachable: {type(exc).__name__}"


def _check_redis(client: redis.Redis) -> str:
    try:
        client.ping()
        return "ok"
    except redis.RedisError as exc:
        return f"unreachable: {type(exc).__name__}"


def _check_kafka(settings: GatewaySettings) -> str:
    try:
        admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=3000,
                                 bootstrap_timeout_ms=3000, client_id="lookalike-gateway-readyz")
    except KafkaError as exc:
        return f"unreachable: {type(exc).__name__}"
    try:
        topics = admin.list_topics()
        return "ok" if settings.products_topic in topics else f"topic {settings.products_topic} missing"
    except KafkaError as exc:
        return f"unreachable: {type(exc).__name__}"
    finally:
        admin.close()


async def prometheus(request: Request) -> Response:
    # In a thread: the queue depth is read from Redis at scrape time.
    return Response(await run_in_threadpool(generate_latest), media_type=CONTENT_TYPE_LATEST)


class _Metrics:
    """ASGI middleware: count requests by route template (low cardinality) and status."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.REQUESTS.labels(route, str(status[0])).inc()
            metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - start)


def create_app(settings: GatewaySettings | None = None) -> Starlette:
    """The ASGI app; ``uvicorn --factory gateway.app:create_app``."""
    settings = settings or GatewaySettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict]:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=3)
        engine = sa.create_engine(settings.database_url, pool_pre_ping=True, pool_size=5)
        celery = Celery("lookalike-gateway", broker=settings.redis_url, set_as_current=False)
        celery.conf.update(broker_connection_retry_on_startup=True, broker_connection_max_retries=1,
                           broker_transport_options={"visibility_timeout": 300, "max_retries": 1})
        metrics.QUEUE_DEPTH.watch(client, QUEUE_VISION)
        yield {"settings": settings, "redis": client, "engine": engine, "celery": celery,
               "store": JobStore(client, settings.job_ttl_s)}
        engine.dispose()
        client.close()

    routes = [
        Route("/v1/jobs", submit_job, methods=["POST"]),
        Route("/v1/jobs/{job_id}", job_status, methods=["GET"], name="job_status"),
        Route("/v1/products/{product_id:int}/image", product_image, methods=["GET"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", prometheus),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={ApiError: handle_api_error})
    app.add_middleware(_Metrics)
    return app
