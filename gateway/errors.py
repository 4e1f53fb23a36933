"""Errors the gateway answers with, as JSON ``{"error": {"code", "message", "field"?}}``.

Hierarchy::

    ApiError              an HTTP status, a stable code and a message for a person
    ├── 4xx               the request is wrong: it says what and how to fix it
    └── 503 unavailable   a backing service is down: retry later (Retry-After)
"""

from __future__ import annotations

import re

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from schemas.api import ErrorBody


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers


async def handle_api_error(request: Request, exc: ApiError) -> JSONResponse:
    body = ErrorBody(error=ErrorBody.Detail(code=exc.code, message=exc.message, field=exc.field))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=exc.status, headers=exc.headers)


# Starlette's own errors (routing; a multipart body request.form() cannot parse): code and hint.
HTTP_ERRORS = {400: ("invalid_form", "; send multipart/form-data with the file field `image` and the options "
                                     "as text fields"),
               404: ("not_found", "; see /openapi.json for the routes"),
               405: ("method_not_allowed", "; see /openapi.json for each route's methods")}


async def handle_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (no route, wrong method, a multipart body it cannot parse) in the same
    JSON body as :class:`ApiError`'s, instead of its plain text."""
    code, hint = HTTP_ERRORS.get(exc.status_code, (f"http_{exc.status_code}", ""))
    return await handle_api_error(request, ApiError(exc.status_code, code, f"{exc.detail}{hint}", headers=exc.headers))


def from_validation(exc: ValidationError) -> ApiError:
    """A 422 naming the invalid field (dotted path, e.g. ``filters.year.gte``), with the value.

    Of a union's errors (one per member) it reports the one that went deepest, the member the
    client most likely meant, and of those one whose type matched (a string too long, not "should be
    a list").
    """
    errors = exc.errors(include_url=False)
    paths = [_field_path(error["loc"]) for error in errors]
    first = paths[0]
    candidates = [i for i, path in enumerate(paths) if path[:len(first)] == first]
    chosen = max(candidates, key=lambda i: (len(errors[i]["loc"]), not errors[i]["type"].endswith("_type"), i))
    error, path = errors[chosen], paths[chosen]
    field = ".".join(path) or None
    top = next((part for part in path if not part.isdigit()), "request")
    value = repr(error.get("input"))
    value = value if len(value) <= 80 else value[:77] + "..."
    message = f"{field + ': ' if field else ''}{error['msg']} (got {value})"
    return ApiError(422, f"invalid_{top}", message, field)


def _field_path(loc: tuple) -> list[str]:
    """A pydantic error location without the union-member tags (``constrained-str``, ``Category``...)."""
    return [str(part) for part in loc if isinstance(part, int) or _FIELD_NAME.match(part)]


_FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
