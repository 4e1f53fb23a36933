"""``GET /openapi.json`` is generated from the schemas and covers every route; schemathesis runs
property-based requests from it against a live gateway (uvicorn on a free port, real Redis,
PostgreSQL and broker, no worker): no request may get a 5xx."""

from __future__ import annotations

import hashlib
import threading
import time

import httpx
import pytest
import redis
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from starlette.routing import Route

from gateway.app import create_app
from gateway.openapi import document
from ops.stack import free_port
from schemas.api import Filters, JobRequest
from schemas.settings import GatewaySettings
from tests.conftest import drop_queued_jobs

KEY = "schemathesis-" + "5a" * 16
EXAMPLES_PER_OPERATION = 30  # ~10 operations: a few hundred requests, about half a minute on 2 cores


def test_the_document_covers_every_route_and_comes_from_the_models(client):
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    routes: dict[str, set[str]] = {}
    for route in client.app.routes:
        if isinstance(route, Route):
            routes.setdefault(route.path.replace(":int", ""), set()).update(route.methods - {"HEAD"})
    assert set(document["paths"]) == set(routes)
    for path, methods in routes.items():
        assert {m.lower() for m in methods} == set(document["paths"][path]), path
    components = document["components"]["schemas"]
    assert set(components["Filters"]["properties"]) == set(Filters.model_fields)
    assert set(components["JobRequest"]["properties"]) == set(JobRequest.model_fields)
    wait_s = next(p for p in document["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"] if p["name"] == "wait_s")
    assert wait_s["schema"]["maximum"] == 3  # the deployment's LOOKALIKE_MAX_WAIT_S (gsettings)


@pytest.fixture(scope="module")
def live_gateway(settings):
    """uvicorn serving the app on 127.0.0.1 in a thread; yields its base URL."""
    gsettings = GatewaySettings(**{**settings.model_dump(), "max_upload_bytes": 64 * 1024, "max_wait_s": 1,
                                   "similar_wait_s": 0.2, "api_key_sha256": [hashlib.sha256(KEY.encode()).hexdigest()]})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(gsettings), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=10)
    drop_queued_jobs(redis.Redis.from_url(gsettings.redis_url))  # no worker here: drop what was queued


OPERATIONS = [(path, method) for path, item in document(GatewaySettings()).get("paths").items() for method in item]


@pytest.mark.parametrize("path, method", OPERATIONS, ids=[f"{m.upper()} {p}" for p, m in OPERATIONS])
def test_no_generated_request_gets_a_server_error(live_gateway, path, method):
    # schemathesis.pytest.from_fixture does not run under pytest 9 (it reads Function._nodeid),
    # so the operation's hypothesis strategy is driven here.
    operation = schemathesis.openapi.from_url(f"{live_gateway}/openapi.json")[path][method]
    # The key goes with POST /v1/products only, so its body validation is what gets fuzzed; with
    # no key DELETE stops at 401 and cannot tombstone the products of the end-to-end test.
    headers = {"X-API-Key": KEY} if (path, method) == ("/v1/products", "post") else None

    # Valid requests by the schema, and invalid ones (wrong types, out of range, missing fields).
    strategy = st.one_of(*(operation.as_strategy(mode, headers=headers) for mode in GenerationMode))

    @given(case=strategy)
    @hypothesis_settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case) -> None:
        case.call_and_validate(checks=[not_a_server_error])

    check()


def test_the_live_gateway_answers_the_document_it_serves(live_gateway):
    assert httpx.get(f"{live_gateway}/openapi.json").json()["info"]["title"] == "Lookalike"
