"""Search options from the three places a request can carry them: a JSON body, multipart form
fields, and query parameters (``/similar``). Each ends as a :class:`schemas.api.SearchOptions`
or an :class:`gateway.errors.ApiError` naming the field."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import get_args, get_origin

from pydantic import BaseModel, ValidationError
from starlette.datastructures import QueryParams

from gateway.errors import ApiError, from_validation
from schemas.api import Category, ImageInput, JobRequest, SearchOptions, SimilarQuery

FORM_OPTIONS = ("crop", "filters", "category", "exclude_ids")


def validated(model: type[BaseModel], data: object) -> BaseModel:
    """``data`` as ``model``.

    Raises:
        ApiError: 422 naming the first invalid field.
    """
    try:
        options = model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None
    return options


def from_json(body: bytes, model: type[ImageInput] = JobRequest) -> tuple[ImageInput, bytes | None]:
    """A JSON body with a photo (``POST /v1/jobs``, ``/v1/embeddings``): the request as ``model``
    and the decoded ``image_base64`` (None for a URL).

    Raises:
        ApiError: 400 not JSON or bad base64; 422 an invalid field.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON ({exc}); send an object such as "
                       "{\"image_url\": \"https://...\", \"k\": 10}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_body", f"the body must be a JSON object, got {type(data).__name__}")
    given = [name for name in ("image_base64", "image_url") if data.get(name) is not None]
    if len(given) != 1:
        raise ApiError(422, "missing_image" if not given else "two_images",
                       "give exactly one of image_base64 (the file, base64) or image_url; got "
                       f"{' and '.join(given) or 'neither'}", "image_base64" if not given else given[1])
    request = validated(model, data)
    if request.image_base64 is None:
        return request, None
    try:
        return request, base64.b64decode(request.image_base64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "invalid_base64", f"image_base64 is not standard base64 ({exc}); encode the file's "
                       "bytes with e.g. `base64 -w0 photo.jpg`", "image_base64") from None


def from_form(form: Mapping[str, object], k: int | None) -> SearchOptions:
    """Options from multipart fields: ``crop``, ``filters``, ``exclude_ids`` as JSON text; ``category``
    as JSON or the bare word ``auto``.

    Raises:
        ApiError: 422 naming the field.
    """
    data: dict[str, object] = {"k": k}
    for name in FORM_OPTIONS:
        raw = form.get(name)
        if raw is None or raw == "":
            continue
        if not isinstance(raw, str):
            raise ApiError(422, f"invalid_{name}", f"{name} must be a text field, not a file", name)
        try:
            data[name] = json.loads(raw)
        except ValueError:
            if name != "category":
                raise ApiError(422, f"invalid_{name}", f"{name} must be JSON, e.g. "
                               f"{_FORM_EXAMPLES[name]}; got {raw[:80]!r}", name) from None
            data[name] = raw
    return validated(SearchOptions, data)


_FORM_EXAMPLES = {"crop": '{"x": 10, "y": 20, "w": 200, "h": 300}', "filters": '{"gender": ["Men", "Unisex"]}',
                  "exclude_ids": "[15970, 39386]", "category": '{"level": "article_type", "value": "Shirts"}'}


def from_query(params: QueryParams) -> SearchOptions:
    """Options from the query parameters of :class:`schemas.api.SimilarQuery`.

    Raises:
        ApiError: 422 naming the parameter, one that is not a parameter of the route included (as an
            unknown JSON key is: a misspelt option must not be searched without).
    """
    for name in params:
        if name not in SimilarQuery.model_fields:
            raise ApiError(422, f"invalid_{name}", f"{name}: not a query parameter of this request; it takes "
                           f"{', '.join(SimilarQuery.model_fields)} (a crop or category=auto needs a photo: "
                           "POST /v1/jobs)", name)
    data = {name: params.getlist(name) if _is_list(info.annotation) else params[name]
            for name, info in SimilarQuery.model_fields.items() if name in params}
    try:
        query = SimilarQuery.model_validate(data)
    except ValidationError as exc:
        error = from_validation(exc)
        error.field = error.field.split(".")[0] if error.field else None
        raise error from None
    try:
        return validated(SearchOptions, query.options())
    except ApiError as exc:
        exc.field = _query_name(exc.field)
        raise


def _is_list(annotation: object) -> bool:
    """``list[...]`` or ``list[...] | None``."""
    return get_origin(annotation) is list or any(get_origin(arg) is list for arg in get_args(annotation))


def _query_name(field: str | None) -> str | None:
    """The query parameter behind a model field path, e.g. ``filters.year.gte`` -> ``year_gte``."""
    if field is None:
        return None
    parts = field.split(".")
    if parts[0] == "filters" and len(parts) > 1:
        return "year_" + (parts[2] if len(parts) > 2 else "gte") if parts[1] == "year" else parts[1]
    if parts[0] == "category" and len(parts) > 1 and parts[1] in Category.model_fields:
        return f"category_{parts[1]}"
    if parts[0] == "exclude_ids":
        return "exclude_id"
    return parts[0]
