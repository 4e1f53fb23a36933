"""``GET /openapi.json``: the OpenAPI 3.1 document, assembled from the pydantic models of
``schemas.api`` (``models_json_schema``), so it cannot drift from what the gateway validates.

Only the paths, parameters and status codes are written here; every body and parameter
schema comes from a model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.api import (CatalogAccepted, EmbeddingForm, EmbeddingRequest, ErrorBody, JobAccepted, JobForm, JobRequest,
                         JobStatus, Product, ProductBatch, SimilarQuery)
from schemas.settings import GatewaySettings

REF = "#/components/schemas/{model}"
VERSION = "1"


def document(settings: GatewaySettings) -> dict[str, Any]:
    """The OpenAPI document for this deployment (limits such as ``max_wait_s`` come from ``settings``)."""
    keys, schemas = models_json_schema(
        [(JobRequest, "validation"), (JobForm, "validation"), (EmbeddingRequest, "validation"),
         (EmbeddingForm, "validation"), (SimilarQuery, "validation"),
         (ProductBatch, "validation"), (JobAccepted, "serialization"), (JobStatus, "serialization"),
         (Product, "serialization"), (CatalogAccepted, "serialization"), (ErrorBody, "serialization")],
        ref_template=REF)

    def ref(model: type[BaseModel], mode: str = "serialization") -> dict[str, str]:
        return keys[(model, mode)]

    def body(model: type[BaseModel], description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": ref(model)}}}

    def errors(*statuses: int) -> dict[str, Any]:
        return {str(s): body(ErrorBody, ERRORS[s]) for s in statuses}

    wait_s = {"name": "wait_s", "in": "query", "required": False, "schema": {
        "type": "number", "minimum": 0, "maximum": settings.max_wait_s},
        "description": "Seconds to wait for the job to end before answering (long-poll)."}
    product_id = {"name": "product_id", "in": "path", "required": True,
                  "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}}
    similar_params = [product_id] + _query_parameters(SimilarQuery, schemas["$defs"], settings)
    paths = {
        "/v1/jobs": {"post": {
            "summary": "Submit a search job: a photo (file, base64 or URL) and options.",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": ref(JobRequest, "validation")},
                "multipart/form-data": {"schema": ref(JobForm, "validation")}}},
            "responses": {"202": body(JobAccepted, "Queued; poll `status_url`."),
                          **errors(400, 413, 415, 422, 503)}}},
        "/v1/embeddings": {"post": {
            "summary": "The vector of a photo, as a job: poll `status_url` for `result.vector`.",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": ref(EmbeddingRequest, "validation")},
                "multipart/form-data": {"schema": ref(EmbeddingForm, "validation")}}},
            "responses": {"202": body(JobAccepted, "Queued; poll `status_url`."),
                          **errors(400, 413, 415, 422, 503)}}},
        "/v1/jobs/{job_id}": {"get": {
            "summary": "A job's status, and its result or error once it ended.",
            "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}},
                           wait_s],
            "responses": {"200": body(JobStatus, "The job."), **errors(404, 422, 503)}}},
        "/v1/products": {"post": {
            "summary": "Add or change products (one or a list): catalog upserts onto Kafka.",
            "security": WRITER, "requestBody": {"required": True, "content": {
                "application/json": {"schema": ref(ProductBatch, "validation")}}},
            "responses": {"202": body(CatalogAccepted, "On the log; searchable in about a second."),
                          **errors(400, 401, 403, 413, 415, 422, 429, 503)}}},
        "/v1/products/{product_id}": {"get": {
            "summary": "A product's metadata.", "parameters": [product_id],
            "responses": {"200": body(Product, "The product."), **errors(404, 503)}}, "delete": {
            "summary": "Delete a product: a catalog delete onto Kafka.", "security": WRITER,
            "parameters": [product_id, {"name": "version", "in": "query", "required": False, "schema": {
                "type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                "description": "Newer wins; default now in ms."}],
            "responses": {"202": body(CatalogAccepted, "On the log."), **errors(401, 403, 404, 422, 429, 503)}}},
        "/v1/products/{product_id}/image": {"get": {
            "summary": "The product's stored JPEG thumbnail.", "parameters": [product_id],
            "responses": {"200": {"description": "JPEG", "content": {"image/jpeg": {"schema": {
                "type": "string", "contentMediaType": "image/jpeg"}}}}, **errors(404)}}},
        "/v1/products/{product_id}/similar": {"get": {
            "summary": "More like this: a search from the product's stored vector, the product excluded.",
            "parameters": similar_params,
            "responses": {"200": body(JobStatus, "The job ended (done or failed)."),
                          "202": body(JobStatus, "Still running after `wait_s`; poll `Location`."),
                          **errors(404, 422, 503)}}},
        "/openapi.json": {"get": {"summary": "This document.", "responses": {"200": _json("OpenAPI 3.1.")}}},
        "/healthz": {"get": {"summary": "The process is up.", "responses": {"200": _json("Up.")}}},
        "/readyz": {"get": {"summary": "PostgreSQL, Redis and the broker answer.",
                            "responses": {"200": _json("Ready."), "503": _json("Not ready, with each check.")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics.", "responses": {"200": {
            "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/": {"get": {"summary": "The search page, for a person (its files are under `/static/`).",
                      "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {
                          "type": "string"}}}}}}},
    }
    return {"openapi": "3.1.0",
            "info": {"title": "Lookalike", "version": VERSION,
                     "description": "Visual product search: a photo in, similar catalog products out."},
            "paths": paths, "components": {"schemas": schemas["$defs"], "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API key (LOOKALIKE_API_KEY_SHA256)."},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}}}


WRITER = [{"bearer": []}, {"apiKey": []}]
ERRORS = {400: "The body is not what it says it is.", 401: "No API key, or not one of this deployment's.",
          403: "This deployment is read-only.", 404: "Unknown or expired.", 413: "Too large.",
          415: "Unsupported content type or image format.", 422: "An invalid field, named in `error.field`.",
          429: "This API key's write rate is spent; retry after `Retry-After`.",
          503: "A backing service is unavailable; retry after `Retry-After`."}


def _json(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}


def _query_parameters(model: type[BaseModel], defs: dict[str, Any], settings: GatewaySettings) -> list[dict]:
    """One query parameter per field of ``model`` (lists repeat the parameter: form style, exploded)."""
    schema = defs[model.__name__]
    params = []
    for name, prop in schema["properties"].items():
        prop = _not_null(prop)
        if name == "wait_s":
            prop["maximum"] = settings.max_wait_s
        param = {"name": name, "in": "query", "required": False, "style": "form", "explode": True, "schema": prop}
        if "description" in prop:
            param["description"] = prop.pop("description")
        params.append(param)
    return params


def _not_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A field's schema without its ``null`` branch and default: an absent parameter is the null."""
    prop = {k: v for k, v in prop.items() if k not in ("default", "title")}
    branches = [b for b in prop.pop("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        prop.update(branches[0])
    elif branches:
        prop["anyOf"] = branches
    return prop
