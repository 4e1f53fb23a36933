"""``lookalike reindex``: fresh shard snapshots from PostgreSQL, optionally for a new model version.

Without a new model version, every shard is rebuilt from the vectors stored in Postgres (no
image is embedded) and written as a snapshot. The snapshot's changelog offset is the
``catalog.vectors`` high watermark read *before* Postgres is read: the indexer writes Postgres
before it publishes a change, so every change below that offset is in the rows read, and the
changes after it are applied on top by whoever loads the snapshot (applying a change that is
already in the rows changes nothing, and later changes of a product come later in its
partition, so the shard converges).

With ``model_version`` V different from the stored vectors' version, every live product whose
V vector is missing or older than the product row is re-embedded from the thumbnail stored in
Postgres (``products.thumbnail``; embeddings of a 160 px thumbnail are close to, not equal
to, those of the original image), in batches, and written as V rows; then V's shards are
built and snapshotted under ``{snapshot_dir}/V/``.

The switch is atomic per query: a worker holds the shards of one model version only (its
``LOOKALIKE_MODEL_VERSION``), embeds the query with that same model, and ignores changelog
entries of any other version, so a query is answered by one version, never a mix. To switch:
``reindex --model-version V`` (the bulk of the work, old workers keep serving), restart the
indexer with V, ``reindex --model-version V`` again (re-embeds only what changed in between),
then restart the workers with V (each loads V's snapshots and tails the changelog).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np
import sqlalchemy as sa
from kafka import KafkaConsumer, TopicPartition
from PIL import Image
from sqlalchemy.dialects.postgresql import insert

from schemas.settings import ModelSettings
from schemas.tables import product_vectors, products
from workers import catalog, snapshots
from workers.embed import Embedder
from workers.shards import IndexPolicy, Shard

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What a reindex did: vectors embedded, and per shard the vectors and snapshot written."""

    model_version: str
    embedded: int = 0
    shard_sizes: dict[int, int] = field(default_factory=dict)
    snapshots: dict[int, str] = field(default_factory=dict)


def changelog_positions(settings: ModelSettings) -> dict[int, tuple[int, int]]:
    """Per partition of ``catalog.vectors``: ``(high watermark, timestamp of the record before it)``;
    partitions with an empty log are left out (a replica replays those from offset 0)."""
    positions = {}
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             auto_offset_reset="none", consumer_timeout_ms=3000)
    try:
        for partition in range(settings.partitions):
            tp = TopicPartition(settings.vectors_topic, partition)
            consumer.assign([tp])
            consumer.seek_to_end(tp)
            end = consumer.position(tp)
            if not end:
                continue
            consumer.seek(tp, end - 1)
            for record in consumer:
                if record.offset == end - 1:
                    positions[partition] = (end, record.timestamp)
                break
    finally:
        consumer.close()
    return positions


def stale_products(engine: sa.Engine, model_version: str) -> int:
    """Live products whose vector of ``model_version`` is missing or older than the product."""
    new = product_vectors.alias("new")
    query = (sa.select(sa.func.count()).select_from(products)
             .outerjoin(new, sa.and_(new.c.product_id == products.c.id, new.c.model_version == model_version))
             .where(products.c.deleted.is_(False),
                    sa.or_(new.c.product_id.is_(None), new.c.updated_at < products.c.updated_at)))
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


def reembed(engine: sa.Engine, embedder: Embedder, batch: int = 64,
            progress: Callable[[int], None] | None = None) -> int:
    """Embed, from their stored thumbnails, the live products whose vector of
    ``embedder.model_version`` is missing or older than the product row; returns how many.

    The shard of each product is the one its vectors of other versions are in (its partition).
    """
    version = embedder.model_version
    new, old = product_vectors.alias("new"), product_vectors.alias("old")
    shard = sa.select(old.c.shard).where(old.c.product_id == products.c.id).limit(1).scalar_subquery()
    query = (sa.select(products.c.id, products.c.thumbnail, shard.label("shard"))
             .outerjoin(new, sa.and_(new.c.product_id == products.c.id, new.c.model_version == version))
             .where(products.c.deleted.is_(False), products.c.thumbnail.is_not(None),
                    sa.or_(new.c.product_id.is_(None), new.c.updated_at < products.c.updated_at))
             .order_by(products.c.id))
    done = 0
    with engine.connect() as reader:
        rows = reader.execution_options(yield_per=batch).execute(query)
        for part in rows.partitions(batch):
            part = [row for row in part if row.shard is not None]
            pixels = [np.asarray(Image.open(BytesIO(row.thumbnail)).convert("RGB")) for row in part]
            vectors = embedder.embed(pixels)
            values = [{"product_id": row.id, "model_version": version, "shard": row.shard, "dim": v.shape[0],
                       "vector": v.astype("<f4").tobytes()} for row, v in zip(part, vectors)]
            if values:
                stmt = insert(product_vectors).values(values)
                with engine.begin() as conn:
                    conn.execute(stmt.on_conflict_do_update(
                        index_elements=[product_vectors.c.product_id, product_vectors.c.model_version],
                        set_={"shard": stmt.excluded.shard, "dim": stmt.excluded.dim,
                              "vector": stmt.excluded.vector, "updated_at": sa.func.now()}))
            done += len(part)
            if progress is not None:
                progress(len(part))
    return done


def rebuild(settings: ModelSettings, engine: sa.Engine, dim: int) -> Report:
    """Build every shard of ``settings.model_version`` from Postgres and write it as a snapshot
    (needs ``settings.snapshot_dir``) at the changelog position read first."""
    if settings.snapshot_dir is None:
        raise ValueError("LOOKALIKE_SNAPSHOT_DIR is not set: there is nowhere to write the shards")
    positions = changelog_positions(settings)  # before reading Postgres: see the module docstring
    report = Report(settings.model_version)
    policy = IndexPolicy.from_settings(settings)
    for partition in range(settings.partitions):
        shard = Shard.build(dim, catalog.load_vectors(engine, settings.model_version, partition), policy)
        offset, timestamp_ms = positions.get(partition, (0, -1))
        written = snapshots.write(settings.snapshot_dir, settings.model_version, partition, shard,
                                  offset, timestamp_ms)
        report.shard_sizes[partition] = shard.ntotal
        report.snapshots[partition] = str(written.path)
        log.info("shard %d of %s: %d vectors, snapshot %s", partition, settings.model_version, shard.ntotal,
                 written.path.name)
    return report


def run(settings: ModelSettings, engine: sa.Engine, model_version: str | None = None,
        progress: Callable[[int, int], Callable[[int], None]] | None = None) -> Report:
    """The whole ``lookalike reindex``: re-embed for ``model_version`` when it is given and differs
    from ``settings.model_version`` (``progress(total)`` returns the callback advancing a bar),
    then rebuild and snapshot every shard of the version the shards are for."""
    target = model_version or settings.model_version
    embedded = 0
    if target != settings.model_version:
        embedder = Embedder.from_settings(settings, target)
        total = stale_products(engine, target)
        advance = progress(total) if progress is not None else None
        embedded = reembed(engine, embedder, batch=max(settings.embed_batch, 32), progress=advance)
    from workers.embed import DIM

    report = rebuild(settings.model_copy(update={"model_version": target}), engine, DIM)
    report.embedded = embedded
    return report
