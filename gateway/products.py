"""The catalog over HTTP: ``GET /v1/products/{id}`` (and its image and "more like this"), and the
catalog writes ``POST /v1/products`` and ``DELETE /v1/products/{id}`` (API key) onto Kafka."""

from __future__ import annotations

import json
import time

import sqlalchemy as sa
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import metrics
from gateway.auth import require_writer
from gateway.errors import ApiError, from_validation
from gateway.jobs import enqueue, parse_wait_s, read_body, wait_for
from gateway.options import from_query as options_from_query
from gateway.uploads import check_image
from schemas.api import (MAX_URL_CHARS, CatalogAccepted, CatalogChange, JobState, Product, ProductBatch,
                         ProductUpsert)
from schemas.events import CatalogEvent
from schemas.jobs import new_job_id
from schemas.settings import GatewaySettings
from schemas.tables import products
from schemas.tasks import TASK_SEARCH, SearchTask

MAX_PRODUCT_ID = 2**63 - 1  # PostgreSQL bigint


def _product_id(request: Request) -> int:
    """The path's product id; one past PostgreSQL's bigint cannot exist (404, not a database error)."""
    product_id = request.path_params["product_id"]
    if product_id > MAX_PRODUCT_ID:
        raise ApiError(404, "unknown_product", f"no product {product_id}: product ids are at most {MAX_PRODUCT_ID}")
    return product_id


async def product(request: Request) -> JSONResponse:
    """``GET /v1/products/{product_id}``: a live product's metadata."""
    found = await _product(request, _product_id(request))
    return JSONResponse(found.model_dump(mode="json"), headers={"Cache-Control": "public, max-age=60"})


async def _product(request: Request, product_id: int) -> Product:
    columns = [products.c.id.label("product_id"), products.c.version, products.c.image_url,
               *(products.c[name] for name in Product.model_fields if name not in ("product_id", "version",
                                                                                   "image_url"))]
    query = sa.select(*columns).where(products.c.id == product_id, products.c.deleted.is_(False))

    def fetch() -> sa.Row | None:
        with request.state.engine.connect() as conn:
            return conn.execute(query).one_or_none()

    try:
        row = await run_in_threadpool(fetch)
    except sa.exc.OperationalError as exc:
        raise ApiError(503, "unavailable", f"the catalog database is unavailable ({type(exc).__name__})",
                       headers={"Retry-After": "5"}) from None
    if row is None:
        raise ApiError(404, "unknown_product", f"no product {product_id} in the catalog (never added, or deleted)")
    fields = row._asdict()
    fields["image_url"] = fields["image_url"] or f"/v1/products/{product_id}/image"
    return Product.model_validate(fields)


async def post_products(request: Request) -> JSONResponse:
    """``POST /v1/products`` (API key): one product or a list, as catalog upserts onto Kafka.
    ``202`` once the broker acknowledged every event; the indexer applies them in about a second."""
    await require_writer(request)
    settings = request.state.settings
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "not_json", "send the products as application/json: one object or a list")
    body = await read_body(request, settings.max_catalog_body_bytes,
                            "LOOKALIKE_MAX_CATALOG_BODY_BYTES; send fewer products per request", None)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON ({exc})") from None
    try:
        items = ProductBatch.parse(data)
    except ValidationError as exc:
        raise from_validation(exc) from None
    for i, item in enumerate(items):
        _check_product_image(item, f"{i}." if isinstance(data, list) else "", settings)
    await run_in_threadpool(request.state.publisher.publish, items)
    metrics.CATALOG_EVENTS.labels("upsert").inc(len(items))
    body = CatalogAccepted(op="upsert", topic=settings.products_topic,
                           changes=[CatalogChange(product_id=i.product_id, version=i.version) for i in items])
    return JSONResponse(body.model_dump(), status_code=202)


def _check_product_image(item: ProductUpsert, prefix: str, settings: GatewaySettings) -> None:
    """Refuse an image the indexer could only dead-letter (a URL is checked further when the indexer
    fetches it, through the SSRF guard)."""
    if item.image.url is not None:
        if not item.image.url.lower().startswith(("http://", "https://")) or len(item.image.url) > MAX_URL_CHARS:
            raise ApiError(422, "invalid_image_url", f"product {item.product_id}: image.url must be an http(s) URL "
                           f"of at most {MAX_URL_CHARS} characters, got {item.image.url[:80]!r}", f"{prefix}image.url")
        return
    try:
        data = item.image.decoded()
    except ValueError as exc:
        raise ApiError(422, "invalid_base64", f"product {item.product_id}: {exc}", f"{prefix}image.data") from None
    try:
        check_image(data, settings.max_upload_bytes, settings.max_pixels)
    except ApiError as exc:
        exc.field, exc.message = f"{prefix}image.data", f"product {item.product_id}: {exc.message}"
        raise


async def delete_product(request: Request) -> JSONResponse:
    """``DELETE /v1/products/{product_id}?version=`` (API key): a catalog delete onto Kafka (version
    default now in ms); ``202`` once the broker acknowledged it. Deleting twice is harmless."""
    await require_writer(request)
    product_id = _product_id(request)
    raw = request.query_params.get("version")
    try:
        event = CatalogEvent(op="delete", product_id=product_id,
                             version=int(raw) if raw is not None else time.time_ns() // 1_000_000)
    except (ValueError, ValidationError):
        raise ApiError(422, "invalid_version", f"version must be a non-negative integer, got {raw!r}",
                       "version") from None
    if event.version > MAX_PRODUCT_ID:
        raise ApiError(422, "invalid_version", f"version must be at most {MAX_PRODUCT_ID}, got {raw}", "version")
    await run_in_threadpool(request.state.publisher.publish, [event])
    metrics.CATALOG_EVENTS.labels("delete").inc()
    body = CatalogAccepted(op="delete", topic=request.state.settings.products_topic,
                           changes=[CatalogChange(product_id=product_id, version=event.version)])
    return JSONResponse(body.model_dump(), status_code=202)


async def similar(request: Request) -> JSONResponse:
    """``GET /v1/products/{product_id}/similar?k=&<filters>&wait_s=``: "more like this" from the
    product's stored vector, the product itself excluded. Runs as a search job and waits up to
    ``wait_s`` (default LOOKALIKE_SIMILAR_WAIT_S): 200 with the job's status when it ended, else
    202 with ``Location`` to poll."""
    settings = request.state.settings
    product_id = _product_id(request)
    options = options_from_query(request.query_params)
    wait_s = parse_wait_s(request, settings.similar_wait_s)
    await _product(request, product_id)
    task = SearchTask(job_id=new_job_id(), k=options.k or settings.default_k, product_id=product_id,
                      filters=options.filters, category=options.category, exclude_ids=options.exclude_ids)
    await enqueue(request, TASK_SEARCH, task, None)
    status = await wait_for(request, task.job_id, wait_s)
    status_url = str(request.url_for("job_status", job_id=task.job_id))
    if status is None:
        raise ApiError(503, "unavailable", f"job {task.job_id} vanished from the job store",
                       headers={"Retry-After": "5"})
    if status.status in (JobState.done, JobState.failed):
        return JSONResponse(status.model_dump(mode="json"))
    return JSONResponse(status.model_dump(mode="json"), status_code=202, headers={"Location": status_url})


async def product_image(request: Request) -> Response:
    """``GET /v1/products/{product_id}/image``: the stored JPEG thumbnail."""
    product_id = _product_id(request)
    query = sa.select(products.c.thumbnail).where(products.c.id == product_id, products.c.deleted.is_(False))

    def fetch() -> bytes | None:
        with request.state.engine.connect() as conn:
            return conn.execute(query).scalar_one_or_none()

    thumbnail = await run_in_threadpool(fetch)
    if thumbnail is None:
        raise ApiError(404, "unknown_product", f"no product {product_id} with an image")
    return Response(thumbnail, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=300"})
