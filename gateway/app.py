"""The HTTP gateway: the app factory, its clients (lifespan), routes, health and metrics.

Jobs are in :mod:`gateway.jobs`, the catalog's endpoints in :mod:`gateway.products`, the search
page at ``/`` in ``gateway/static/``. It never imports torch or faiss.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import redis
import redis.asyncio
import sqlalchemy as sa
from celery import Celery
from kafka import KafkaAdminClient
from kafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway import jobs, metrics, products
from gateway.catalog import CatalogPublisher
from gateway.errors import ApiError, handle_api_error, handle_http_error
from gateway.openapi import document as openapi_document
from schemas.jobs import JobStore
from schemas.settings import GatewaySettings
from schemas.tasks import QUEUE_VISION, transport_options

STATIC = Path(__file__).parent / "static"


async def page(request: Request) -> FileResponse:
    """``GET /``: the search page (HTML, vanilla JS and CSS from ``gateway/static/``, no build step)."""
    return FileResponse(STATIC / "index.html")


async def openapi(request: Request) -> JSONResponse:
    """``GET /openapi.json``: generated from the schemas (see :mod:`gateway.openapi`)."""
    return JSONResponse(request.state.openapi)


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
    workers = await run_in_threadpool(_worker_replicas, state.store) if checks["redis"] == "ok" else []
    return JSONResponse({"ready": ready, "checks": checks, "workers": workers}, status_code=200 if ready else 503)


def _worker_replicas(store: JobStore) -> list[dict]:
    """How far behind each live worker's replicas are (reported to Redis by the workers): changelog
    records not applied yet (``lag``, null until known), vectors held, seconds since the report.
    A worker that is catching up still answers searches; this says how stale its answers may be."""
    try:
        reports = store.replicas()
    except redis.RedisError:
        return []
    now = time.time()
    return [{"worker": r.worker, "model_version": r.model_version, "lag": r.lag, "vectors": r.ntotal,
             "reported_s_ago": round(now - r.updated_at, 1)} for r in reports]


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
        aclient = redis.asyncio.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=3)
        engine = sa.create_engine(settings.database_url, pool_pre_ping=True, pool_size=5)
        celery = Celery("lookalike-gateway", broker=settings.redis_url, set_as_current=False)
        celery.conf.update(broker_connection_retry_on_startup=True, broker_connection_max_retries=1,
                           broker_transport_options=transport_options(settings.visibility_timeout_s, max_retries=1))
        metrics.QUEUE_DEPTH.watch(client, QUEUE_VISION)
        publisher = CatalogPublisher(settings)
        yield {"settings": settings, "redis": client, "aredis": aclient, "engine": engine, "celery": celery,
               "store": JobStore(client, settings.job_ttl_s), "openapi": openapi_document(settings),
               "publisher": publisher}
        publisher.close()
        engine.dispose()
        client.close()
        await aclient.aclose()

    routes = [
        Route("/v1/jobs", jobs.submit_job, methods=["POST"]),
        Route("/v1/embeddings", jobs.submit_embedding, methods=["POST"]),
        Route("/v1/jobs/{job_id}", jobs.job_status, methods=["GET"], name="job_status"),
        Route("/v1/products", products.post_products, methods=["POST"]),
        Route("/v1/products/{product_id:int}", products.product, methods=["GET"]),
        Route("/v1/products/{product_id:int}", products.delete_product, methods=["DELETE"]),
        Route("/v1/products/{product_id:int}/image", products.product_image, methods=["GET"]),
        Route("/v1/products/{product_id:int}/similar", products.similar, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", prometheus),
        Route("/", page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={ApiError: handle_api_error,
                                                                     HTTPException: handle_http_error})
    app.add_middleware(_Metrics)
    return app
