"""API keys for catalog writes: the settings hold SHA-256 digests, never keys.

A key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; its digest is compared
with each allowed digest in constant time (``hmac.compare_digest``). Each key may make
``write_rate_per_min`` requests per minute: a fixed-window counter per key and minute in Redis
(``INCR`` + ``EXPIRE``), shared by every gateway process.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time

import redis
from starlette.requests import Request

from gateway import metrics
from gateway.errors import ApiError
from schemas.jobs import rate_key
from schemas.settings import GatewaySettings


async def require_writer(request: Request) -> None:
    """Let the request write the catalog, or refuse it.

    Raises:
        ApiError: 403 ``read_only`` when this deployment takes no writes; 401 ``missing_api_key`` or
            ``invalid_api_key`` (with ``WWW-Authenticate: Bearer``); 429 ``rate_limited`` (with
            ``Retry-After``); 503 when Redis cannot count.
    """
    settings: GatewaySettings = request.state.settings
    if settings.read_only or not settings.api_key_sha256:
        why = "LOOKALIKE_READ_ONLY=true" if settings.read_only else "no LOOKALIKE_API_KEY_SHA256 is set"
        raise ApiError(403, "read_only", f"this deployment does not take catalog writes ({why}); publish to "
                       "Kafka with `lookalike publish` or use a deployment that allows writes")
    key = _presented_key(request)
    if key is None:
        raise ApiError(401, "missing_api_key", "catalog writes need an API key: send `Authorization: Bearer "
                       "<key>` or `X-API-Key: <key>`", headers={"WWW-Authenticate": "Bearer"})
    digest = hashlib.sha256(key.encode()).hexdigest()
    if not any([hmac.compare_digest(digest, allowed) for allowed in settings.api_key_sha256]):
        raise ApiError(401, "invalid_api_key", "the API key is not one of this deployment's keys "
                       "(LOOKALIKE_API_KEY_SHA256 holds their SHA-256 digests)", headers={"WWW-Authenticate": "Bearer"})
    if settings.write_rate_per_min:
        await _count(request, digest[:16], settings.write_rate_per_min)


async def _count(request: Request, who: str, per_min: int) -> None:
    now = time.time()
    minute = int(now // 60)
    key = rate_key(who, minute)
    try:
        async with request.state.aredis.pipeline(transaction=True) as pipe:
            count, _ = await pipe.incr(key).expire(key, 120).execute()
    except redis.RedisError as exc:
        raise ApiError(503, "unavailable", f"the rate limiter (Redis) is unavailable ({type(exc).__name__})",
                       headers={"Retry-After": "5"}) from None
    if count > per_min:
        metrics.REQUESTS_REFUSED.labels("rate_limited").inc()
        retry_after = str(max(1, math.ceil((minute + 1) * 60 - now)))
        raise ApiError(429, "rate_limited", f"this API key made {count} catalog writes this minute, more than "
                       f"{per_min} (LOOKALIKE_WRITE_RATE_PER_MIN); retry after {retry_after} s, or send a list of "
                       "products in one request", headers={"Retry-After": retry_after})


def _presented_key(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None
