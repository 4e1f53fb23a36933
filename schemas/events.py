"""Kafka payloads: the catalog event (``catalog.products``), the vector change
(``catalog.vectors``) and the dead letter (``catalog.products.dlq``).

All are JSON, keyed by the product id (decimal string) so one product's events
stay ordered in one partition.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

BIGINT_MAX = 2**63 - 1  # products.id and .version are PostgreSQL BIGINT (schemas/tables.py)


def _storable(value: str) -> str:
    """Text PostgreSQL can store: no NUL character, valid Unicode (JSON may carry a lone surrogate)."""
    if "\x00" in value:
        raise ValueError("contains a NUL character (\\u0000), which PostgreSQL text cannot hold; remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (a lone surrogate, e.g. \\ud800); send UTF-8 text") from None
    return value


# A category, gender, colour..., in an event and in a search filter (schemas.api): short enough for
# master_category's btree index (PostgreSQL refuses index rows over 8191 bytes).
Text = Annotated[str, Field(max_length=200), AfterValidator(_storable)]
Title = Annotated[str, Field(max_length=2000), AfterValidator(_storable)]
Reference = Annotated[str, AfterValidator(_storable)]


class ImageRef(BaseModel):
    """Where a product's photo is: exactly one of ``url``, ``path`` or ``data`` (base64)."""

    url: Reference | None = None
    path: Reference | None = None
    data: str | None = Field(None, description="The file's bytes, standard base64.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageRef:
        given = [name for name in ("url", "path", "data") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"image needs exactly one of url, path or data; got {given or 'none'}")
        if not getattr(self, given[0]).strip():
            raise ValueError(f"image.{given[0]} is empty; give the photo's URL, path or base64 bytes")
        return self

    def decoded(self) -> bytes:
        """The bytes of ``data``.

        Raises:
            ValueError: ``data`` is not valid base64.
        """
        try:
            return base64.b64decode(self.data or "", validate=True)
        except binascii.Error as exc:
            raise ValueError(f"image.data is not valid base64: {exc}") from None


class CatalogEvent(BaseModel):
    """One change to the catalog. A version older than the stored one is ignored."""

    op: Literal["upsert", "delete"]
    product_id: int = Field(ge=1, le=BIGINT_MAX)
    version: int = Field(ge=0, le=BIGINT_MAX, description="Monotonic per product, e.g. a timestamp in ms.")
    title: Title | None = None
    gender: Text | None = None
    master_category: Text | None = None
    sub_category: Text | None = None
    article_type: Text | None = None
    base_colour: Text | None = None
    season: Text | None = None
    year: int | None = Field(None, ge=0, le=9999)
    usage: Text | None = None
    image: ImageRef | None = None

    @model_validator(mode="after")
    def _upsert_is_complete(self) -> CatalogEvent:
        if self.op == "upsert":
            missing = [f for f in ("title", "master_category", "image") if getattr(self, f) in (None, "")]
            if missing:
                raise ValueError(f"an upsert needs {', '.join(missing)}")
        return self

    @field_validator("title", "gender", "master_category", "sub_category", "article_type",
                     "base_colour", "season", "usage")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        return value.strip() or None if isinstance(value, str) else value

    def key(self) -> bytes:
        """The Kafka message key: the product id as ASCII digits."""
        return str(self.product_id).encode()


class VectorChange(BaseModel):
    """One entry of the index changelog: put or remove a product's vector in shard ``partition``."""

    op: Literal["upsert", "delete"]
    product_id: int
    version: int
    model_version: str
    vector: str | None = Field(None, description="float32 little-endian, base64; absent for a delete.")
    source_timestamp_ms: int | None = Field(None, description=(
        "Kafka timestamp (ms since the epoch) of the catalog event this change comes from, so a replica "
        "can measure freshness; absent in changes written before it existed."))

    @classmethod
    def of(cls, product_id: int, version: int, model_version: str, vector: np.ndarray | None,
           source_timestamp_ms: int | None = None) -> VectorChange:
        """An upsert of ``vector`` (float32 (D,)), or a delete when it is None."""
        return cls(op="delete" if vector is None else "upsert", product_id=product_id, version=version,
                   model_version=model_version, source_timestamp_ms=source_timestamp_ms,
                   vector=None if vector is None else base64.b64encode(vector.astype("<f4").tobytes()).decode())

    def array(self) -> np.ndarray | None:
        """The vector, float32 (D,); None for a delete."""
        return None if self.op == "delete" else np.frombuffer(base64.b64decode(self.vector or ""), dtype="<f4")


class DeadLetter(BaseModel):
    """An event that can never succeed, with why and where it came from."""

    reason: str
    topic: str
    partition: int
    offset: int
    key: str | None
    payload: str = Field(description="The original message value, base64.")

    @field_validator("payload")
    @classmethod
    def _base64(cls, payload: str) -> str:
        base64.b64decode(payload, validate=True)  # binascii.Error is a ValueError: the letter is invalid
        return payload
