"""The catalog in PostgreSQL: products and their vectors, written idempotently by version."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from schemas.api import TEXT_FILTERS, Category, Filters
from schemas.events import CatalogEvent
from schemas.tables import product_vectors, products

METADATA_FIELDS = ("title", "gender", "master_category", "sub_category", "article_type",
                   "base_colour", "season", "year", "usage")


@dataclass(frozen=True)
class Upsert:
    """A product to write with its vector (float32 (D,), L2-normalised) and thumbnail JPEG (None:
    none stored; `lookalike reindex --model-version` then skips the product)."""

    event: CatalogEvent
    shard: int
    vector: np.ndarray
    thumbnail: bytes | None


def stored_versions(conn: sa.Connection, ids: Iterable[int]) -> dict[int, int]:
    """Stored version of each product id that exists (tombstones included)."""
    rows = conn.execute(sa.select(products.c.id, products.c.version).where(products.c.id.in_(list(ids))))
    return dict(rows.tuples().all())


def write_upserts(conn: sa.Connection, items: list[Upsert], model_version: str) -> list[int]:
    """Write products and vectors where the event's version is newer than the stored one.

    Returns:
        Ids that were written; the others were stale (an equal or newer version is stored).
    """
    if not items:
        return []
    rows = [{"id": u.event.product_id, "version": u.event.version, "deleted": False, "thumbnail": u.thumbnail,
             "image_url": u.event.image.url if u.event.image else None,
             **{f: getattr(u.event, f) for f in METADATA_FIELDS}} for u in items]
    stmt = insert(products).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=[products.c.id],
        set_={**{c: stmt.excluded[c] for c in rows[0] if c != "id"}, "updated_at": sa.func.now()},
        where=products.c.version < stmt.excluded.version,
    ).returning(products.c.id)
    written = set(conn.execute(stmt).scalars())
    vectors = [{"product_id": u.event.product_id, "model_version": model_version, "shard": u.shard,
                "dim": u.vector.shape[0], "vector": u.vector.astype("<f4").tobytes()}
               for u in items if u.event.product_id in written]
    if vectors:
        vstmt = insert(product_vectors).values(vectors)
        conn.execute(vstmt.on_conflict_do_update(
            index_elements=[product_vectors.c.product_id, product_vectors.c.model_version],
            set_={"shard": vstmt.excluded.shard, "dim": vstmt.excluded.dim, "vector": vstmt.excluded.vector,
                  "updated_at": sa.func.now()}))
    return [u.event.product_id for u in items if u.event.product_id in written]


def write_deletes(conn: sa.Connection, events: list[CatalogEvent]) -> list[int]:
    """Tombstone products (keeping the version) and drop their vectors, where the event is newer.

    Returns:
        Ids that were deleted now.
    """
    if not events:
        return []
    stmt = insert(products).values([{"id": e.product_id, "version": e.version, "deleted": True} for e in events])
    stmt = stmt.on_conflict_do_update(
        index_elements=[products.c.id],
        set_={"version": stmt.excluded.version, "deleted": True, "thumbnail": None, "updated_at": sa.func.now()},
        where=products.c.version < stmt.excluded.version,
    ).returning(products.c.id)
    deleted = list(conn.execute(stmt).scalars())
    if deleted:
        conn.execute(sa.delete(product_vectors).where(product_vectors.c.product_id.in_(deleted)))
    return deleted


def load_vectors(engine: sa.Engine, model_version: str, shard: int | None = None, chunk: int = 10_000
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every live product's vector of ``model_version`` (in one shard, if given), streamed in chunks.

    Yields:
        ``(shards, ids, vectors)``: int32 (N,), int64 (N,), float32 (N, D).
    """
    query = (sa.select(product_vectors.c.shard, product_vectors.c.product_id, product_vectors.c.vector)
             .join(products, products.c.id == product_vectors.c.product_id)
             .where(product_vectors.c.model_version == model_version, products.c.deleted.is_(False))
             .execution_options(yield_per=chunk))
    if shard is not None:
        query = query.where(product_vectors.c.shard == shard)
    with engine.connect() as conn:
        for part in conn.execute(query).partitions():
            shards, ids, blobs = zip(*part)
            yield (np.array(shards, dtype=np.int32), np.array(ids, dtype=np.int64),
                   np.stack([np.frombuffer(b, dtype="<f4") for b in blobs]))


def current_state(conn: sa.Connection, ids: Iterable[int], model_version: str
                  ) -> list[tuple[int, int, bool, np.ndarray | None]]:
    """``(id, version, deleted, vector or None)`` of stored products, for re-publishing their changes."""
    query = (sa.select(products.c.id, products.c.version, products.c.deleted, product_vectors.c.vector)
             .outerjoin(product_vectors, sa.and_(product_vectors.c.product_id == products.c.id,
                                                 product_vectors.c.model_version == model_version))
             .where(products.c.id.in_(list(ids))))
    return [(row.id, row.version, row.deleted,
             None if row.vector is None else np.frombuffer(row.vector, dtype="<f4"))
            for row in conn.execute(query)]


def fetch_products(engine: sa.Engine, ids: Iterable[int]) -> dict[int, sa.Row]:
    """Live products by id (metadata columns only, no thumbnail)."""
    ids = list(ids)
    if not ids:
        return {}
    columns = [products.c.id, products.c.image_url, *(products.c[f] for f in METADATA_FIELDS)]
    with engine.connect() as conn:
        rows = conn.execute(sa.select(*columns).where(products.c.id.in_(ids), products.c.deleted.is_(False)))
        return {row.id: row for row in rows}


def count_vectors(engine: sa.Engine, model_version: str, ids: Iterable[int] | None = None) -> int:
    """How many live products have a vector of ``model_version`` (optionally among ``ids``)."""
    query = (sa.select(sa.func.count()).select_from(product_vectors)
             .join(products, products.c.id == product_vectors.c.product_id)
             .where(product_vectors.c.model_version == model_version, products.c.deleted.is_(False)))
    if ids is not None:
        query = query.where(product_vectors.c.product_id.in_(list(ids)))
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


def matching_ids(engine: sa.Engine, filters: Filters | None, category: Category | None) -> np.ndarray | None:
    """Ids of live products that pass ``filters`` and lie in ``category``.

    Returns:
        int64 (N,) ascending, or None when neither restricts anything (every product passes).
    """
    conditions = []
    wanted = filters.model_dump(exclude_none=True) if filters else {}
    for name in TEXT_FILTERS:
        if name in wanted:
            value = wanted[name]
            conditions.append(products.c[name] == value if isinstance(value, str) else products.c[name].in_(value))
    if filters and filters.year:
        if filters.year.gte is not None:
            conditions.append(products.c.year >= filters.year.gte)
        if filters.year.lte is not None:
            conditions.append(products.c.year <= filters.year.lte)
    if category is not None:
        conditions.append(products.c[category.level] == category.value)
    if not conditions:
        return None
    query = sa.select(products.c.id).where(products.c.deleted.is_(False), *conditions).order_by(products.c.id)
    with engine.connect() as conn:
        return np.fromiter(conn.execute(query).scalars(), dtype=np.int64)


def fetch_vector(engine: sa.Engine, product_id: int, model_version: str) -> np.ndarray | None:
    """A live product's stored vector: float32 (D,) L2-normalised, or None if it has none of ``model_version``."""
    query = (sa.select(product_vectors.c.vector)
             .join(products, products.c.id == product_vectors.c.product_id)
             .where(product_vectors.c.product_id == product_id, product_vectors.c.model_version == model_version,
                    products.c.deleted.is_(False)))
    with engine.connect() as conn:
        blob = conn.execute(query).scalar_one_or_none()
    return None if blob is None else np.frombuffer(blob, dtype="<f4").astype(np.float32)
