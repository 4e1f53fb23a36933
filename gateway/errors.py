"""Errors the gateway answers with, as JSON ``{"error": {"code", "message", "field"?}}``.

Hierarchy::

    ApiError              an HTTP status, a stable code and a message for a person
    ├── 4xx               the request is wrong: it says what and how to fix it
    └── 503 unavailable   a backing service is down: retry later (Retry-After)
"""

from __future__ import annotations

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
