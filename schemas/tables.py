"""PostgreSQL tables (SQLAlchemy Core): the system of record. Migrations live in ``migrations/``."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

products = sa.Table(
    "products",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False, comment="styles.csv id"),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false(),
              comment="A tombstone keeps the version so an older upsert cannot resurrect the product."),
    sa.Column("title", sa.Text),
    sa.Column("gender", sa.Text),
    sa.Column("master_category", sa.Text, index=True),
    sa.Column("sub_category", sa.Text),
    sa.Column("article_type", sa.Text),
    sa.Column("base_colour", sa.Text),
    sa.Column("season", sa.Text),
    sa.Column("year", sa.Integer),
    sa.Column("usage", sa.Text),
    sa.Column("image_url", sa.Text),
    sa.Column("thumbnail", sa.LargeBinary, comment="JPEG, longest side LOOKALIKE_THUMBNAIL_PX"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

product_vectors = sa.Table(
    "product_vectors",
    metadata,
    sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("model_version", sa.Text, primary_key=True),
    sa.Column("shard", sa.Integer, nullable=False, comment="partition of catalog.products"),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("vector", sa.LargeBinary, nullable=False, comment="float32 little-endian, L2-normalised"),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Index("ix_product_vectors_model_shard", "model_version", "shard"),
)
