"""HTTP bodies of the gateway: job submission and its options, job status, the search result,
products, and the error body."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

import time

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

from schemas.events import BIGINT_MAX, CatalogEvent, ImageRef, Text

MAX_K = 100
MAX_EXCLUDE_IDS = 1000
MAX_IN_VALUES = 100
MAX_URL_CHARS = 2048
MAX_SIDE_PX = 1 << 20


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class Box(BaseModel):
    """A box in pixels of the uploaded image (EXIF orientation applied): top-left corner and size."""

    model_config = ConfigDict(extra="forbid")

    # strict: whole numbers only; true, false and "10" are refused, not read as 1, 0 and 10
    x: int = Field(ge=0, le=MAX_SIDE_PX, strict=True, description="Left edge, pixels from the image's left.")
    y: int = Field(ge=0, le=MAX_SIDE_PX, strict=True, description="Top edge, pixels from the image's top.")
    w: int = Field(ge=1, le=MAX_SIDE_PX, strict=True, description="Width in pixels.")
    h: int = Field(ge=1, le=MAX_SIDE_PX, strict=True, description="Height in pixels.")


Values = Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_IN_VALUES)]
ProductId = Annotated[int, Field(ge=1, le=BIGINT_MAX)]


class YearRange(BaseModel):
    """An inclusive range of the product's ``year``; either bound may be left out."""

    model_config = ConfigDict(extra="forbid")

    gte: int | None = Field(None, ge=0, le=9999, description="Lowest year, inclusive.")
    lte: int | None = Field(None, ge=0, le=9999, description="Highest year, inclusive.")

    @model_validator(mode="after")
    def _ordered(self) -> YearRange:
        if self.gte is not None and self.lte is not None and self.gte > self.lte:
            raise ValueError(f"year range is empty: gte {self.gte} is after lte {self.lte}")
        return self


class Filters(BaseModel):
    """Metadata the results must have. A string means equal to it; a list means any of them."""

    model_config = ConfigDict(extra="forbid")

    gender: Values | None = None
    master_category: Values | None = None
    sub_category: Values | None = None
    article_type: Values | None = None
    base_colour: Values | None = None
    season: Values | None = None
    usage: Values | None = None
    year: YearRange | None = None


TEXT_FILTERS = ("gender", "master_category", "sub_category", "article_type", "base_colour", "season", "usage")


class Category(BaseModel):
    """Restrict results to one category at one level of the catalog's taxonomy."""

    model_config = ConfigDict(extra="forbid")

    level: Literal["master_category", "sub_category", "article_type"] = Field(
        description="`master_category` (e.g. Apparel), `sub_category` (e.g. Topwear) or `article_type` "
                    "(e.g. Shirts).")
    value: Text = Field(min_length=1, description="The category's name, exactly as in the catalog.")


class SearchOptions(BaseModel):
    """What to search for besides the image; every field is optional."""

    model_config = ConfigDict(extra="forbid")

    # strict, as Box's: true and "5" are not read as 1 and 5
    k: int | None = Field(None, ge=1, le=MAX_K, strict=True,
                          description="How many products to return (default LOOKALIKE_DEFAULT_K).")
    crop: Box | None = Field(None, description="Search only this part of the image, in pixels of the uploaded "
                                               "image; it must lie inside the image.")
    filters: Filters | None = None
    category: Literal["auto"] | Category | None = Field(None, description=(
        "Restrict to a category: an object `{level, value}`, or `auto`: the category the worker predicts "
        "for the photo, at the most specific level (`article_type`, else `sub_category`, else "
        "`master_category`) whose top probability is at least LOOKALIKE_AUTO_CATEGORY_MIN_PROB; no "
        "restriction when no level is that sure. The result's `category` says which was used."))
    exclude_ids: list[Annotated[ProductId, Field(strict=True)]] = Field(
        default_factory=list, max_length=MAX_EXCLUDE_IDS, description="Product ids never to return.")


class ImageInput(BaseModel):
    """A photo in a JSON body: exactly one of ``image_base64`` or ``image_url``."""

    model_config = ConfigDict(extra="forbid")

    image_base64: str | None = Field(None, description="The photo file's bytes, standard base64; at most "
                                                      "LOOKALIKE_MAX_UPLOAD_BYTES once decoded.")
    image_url: str | None = Field(None, max_length=MAX_URL_CHARS, pattern=r"^[hH][tT][tT][pP][sS]?://",
                                  description="An http(s) URL the worker fetches the photo from.")

    @model_validator(mode="after")
    def _exactly_one_image(self) -> ImageInput:
        given = [name for name in ("image_base64", "image_url") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of image_base64 or image_url; got {' and '.join(given) or 'neither'}")
        return self


class JobRequest(SearchOptions, ImageInput):
    """``POST /v1/jobs`` as JSON: exactly one of ``image_base64`` or ``image_url``, and options."""


class EmbeddingRequest(ImageInput):
    """``POST /v1/embeddings`` as JSON: exactly one of ``image_base64`` or ``image_url``, and a ``crop``."""

    crop: Box | None = Field(None, description="Embed only this part of the image, in pixels of the uploaded "
                                               "image; it must lie inside the image.")


class JobForm(BaseModel):
    """``POST /v1/jobs`` as multipart/form-data: the file, and the options of :class:`SearchOptions`
    each as the JSON text of its value (``category`` may also be the bare word ``auto``)."""

    image: bytes = Field(description="The photo file: JPEG, PNG, WebP, GIF, BMP or TIFF, at most "
                                     "LOOKALIKE_MAX_UPLOAD_BYTES.")
    k: int | None = Field(None, ge=1, le=MAX_K)
    crop: str | None = Field(None, description='JSON of a Box, e.g. `{"x": 10, "y": 20, "w": 200, "h": 300}`.')
    filters: str | None = Field(None, description='JSON of Filters, e.g. `{"gender": ["Men", "Unisex"]}`.')
    category: str | None = Field(None, description='JSON of a Category, e.g. '
                                                   '`{"level": "article_type", "value": "Shirts"}`.')
    exclude_ids: str | None = Field(None, description="JSON list of product ids, e.g. `[15970, 39386]`.")


class SimilarQuery(BaseModel):
    """Query parameters of ``GET /v1/products/{product_id}/similar``: the options of
    :class:`SearchOptions`, flattened. Repeat a filter parameter for "any of"."""

    k: int | None = Field(None, ge=1, le=MAX_K)
    gender: list[Text] | None = Field(None, max_length=MAX_IN_VALUES)
    master_category: list[Text] | None = Field(None, max_length=MAX_IN_VALUES)
    sub_category: list[Text] | None = Field(None, max_length=MAX_IN_VALUES)
    article_type: list[Text] | None = Field(None, max_length=MAX_IN_VALUES)
    base_colour: list[Text] | None = Field(None, max_length=MAX_IN_VALUES)
    season: list[Text] | None = Field(None, max_length=MAX_IN_VALUES)
    usage: list[Text] | None = Field(None, max_length=MAX_IN_VALUES)
    year_gte: int | None = Field(None, ge=0, le=9999)
    year_lte: int | None = Field(None, ge=0, le=9999)
    category_level: Literal["master_category", "sub_category", "article_type"] | None = None
    category_value: Text | None = Field(None, min_length=1)
    exclude_id: list[ProductId] = Field(default_factory=list, max_length=MAX_EXCLUDE_IDS)
    wait_s: float | None = Field(None, ge=0, description="Seconds to wait for the job (at most LOOKALIKE_MAX_WAIT_S; "
                                                         "default LOOKALIKE_SIMILAR_WAIT_S).")

    def options(self) -> dict:
        """The equivalent :class:`SearchOptions` fields, to validate as one."""
        filters: dict[str, object] = {name: getattr(self, name) for name in TEXT_FILTERS if getattr(self, name)}
        year = {bound: getattr(self, f"year_{bound}") for bound in ("gte", "lte")
                if getattr(self, f"year_{bound}") is not None}
        if year:
            filters["year"] = year
        options: dict[str, object] = {"k": self.k, "filters": filters or None, "exclude_ids": self.exclude_id}
        if self.category_level is not None or self.category_value is not None:
            options["category"] = {"level": self.category_level, "value": self.category_value}
        return options


class EmbeddingForm(BaseModel):
    """``POST /v1/embeddings`` as multipart/form-data: the file and an optional ``crop`` (JSON text)."""

    image: bytes = Field(description=JobForm.model_fields["image"].description)
    crop: str | None = Field(None, description=JobForm.model_fields["crop"].description)


class ProductHit(BaseModel):
    product_id: int
    score: float = Field(description="Cosine similarity of the L2-normalised embeddings, in [-1, 1].")
    title: str | None
    gender: str | None
    master_category: str | None
    sub_category: str | None
    article_type: str | None
    base_colour: str | None
    image_url: str | None = Field(description="Where the storefront can show the product's photo.")


class Product(BaseModel):
    """``GET /v1/products/{product_id}``: a live product's metadata."""

    product_id: int
    version: int
    title: str | None
    gender: str | None
    master_category: str | None
    sub_category: str | None
    article_type: str | None
    base_colour: str | None
    season: str | None
    year: int | None
    usage: str | None
    image_url: str = Field(description="Where the product's photo is: its source URL or the stored thumbnail.")


class CategoryScore(BaseModel):
    label: str = Field(description="A category of the catalog, or `other` (rare categories folded together).")
    prob: float = Field(description="Probability in [0, 1]: the category heads' softmax, blended with the votes of "
                                    "the nearest catalog products unless LOOKALIKE_CATEGORY_VOTES is false.")


class SearchResult(BaseModel):
    model_version: str
    box: Box | None = Field(description="The part of the image that was embedded; null for a search by "
                                        "product (`/similar`).")
    products: list[ProductHit]
    categories: dict[str, list[CategoryScore]] | None = Field(None, description=(
        "The query's predicted categories by level (`master_category`, `sub_category`, `article_type`), "
        "the 3 most likely first, from the category heads on its embedding; null if the worker has none."))
    category: Category | None = Field(None, description="The category the search was restricted to: the one "
                                                        "asked for, the one `auto` chose, or null for none.")


class EmbeddingResult(BaseModel):
    """The result of ``POST /v1/embeddings``: the image's vector, as the catalog's vectors are made."""

    model_version: str
    box: Box = Field(description="The part of the image that was embedded.")
    dim: int
    vector: list[float] = Field(description="float32 values, L2-normalised: a dot product with another is the cosine.")


class JobError(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. `invalid_image`.")
    message: str = Field(description="What was wrong and what to do, for a person.")


class JobAccepted(BaseModel):
    job_id: str
    status_url: str


class JobStatus(BaseModel):
    job_id: str
    status: JobState
    result: SearchResult | EmbeddingResult | None = Field(None, description=(
        "A search job's products, or an embedding job's vector; null until done."))
    error: JobError | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    created_at: float = Field(description="Unix time, seconds.")
    updated_at: float


class ErrorBody(BaseModel):
    class Detail(BaseModel):
        code: str
        message: str
        field: str | None = None

    error: Detail


class ProductUpsert(CatalogEvent):
    """One product for ``POST /v1/products``: a catalog upsert event with ``op`` implied and
    ``version`` defaulting to now in ms. The image comes as ``data`` (base64) or ``url``, never
    ``path`` (that would read the server's disk)."""

    model_config = ConfigDict(extra="forbid")

    op: Literal["upsert"] = "upsert"
    product_id: ProductId
    version: int = Field(default_factory=lambda: time.time_ns() // 1_000_000, ge=0, le=BIGINT_MAX,
                         description="Newer wins; default now in ms. An older or equal version changes nothing.")
    year: int | None = Field(None, ge=0, le=9999)

    @field_validator("image")
    @classmethod
    def _no_server_paths(cls, image: ImageRef | None) -> ImageRef | None:
        if image is not None and image.path is not None:
            raise ValueError("image.path is not accepted over HTTP; send image.data (base64) or image.url")
        return image


class ProductBatch(RootModel[ProductUpsert | list[ProductUpsert]]):
    """``POST /v1/products``: one product, or a list of at most 100."""

    root: ProductUpsert | Annotated[list[ProductUpsert], Field(min_length=1, max_length=100)]

    def items(self) -> list[ProductUpsert]:
        return self.root if isinstance(self.root, list) else [self.root]

    @classmethod
    def parse(cls, data: object) -> list[ProductUpsert]:
        """The products in ``data``, validated as the one shape it has (so errors name that shape's field).

        Raises:
            pydantic.ValidationError: a product is invalid.
        """
        if isinstance(data, dict):
            return [ProductUpsert.model_validate(data)]
        return cls.model_validate(data).items()


class CatalogChange(BaseModel):
    product_id: int
    version: int


class CatalogAccepted(BaseModel):
    """``202`` of a catalog write: the events are on the log; the indexer applies them in about a second."""

    op: Literal["upsert", "delete"]
    topic: str
    changes: list[CatalogChange]
