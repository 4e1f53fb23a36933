"""products and product_vectors

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "products",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False, comment="styles.csv id"),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("title", sa.Text),
        sa.Column("gender", sa.Text),
        sa.Column("master_category", sa.Text),
        sa.Column("sub_category", sa.Text),
        sa.Column("article_type", sa.Text),
        sa.Column("base_colour", sa.Text),
        sa.Column("season", sa.Text),
        sa.Column("year", sa.Integer),
        sa.Column("usage", sa.Text),
        sa.Column("image_url", sa.Text),
        sa.Column("thumbnail", sa.LargeBinary),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_products_master_category", "products", ["master_category"])
    op.create_table(
        "product_vectors",
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("model_version", sa.Text, primary_key=True),
        sa.Column("shard", sa.Integer, nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_product_vectors_model_shard", "product_vectors", ["model_version", "shard"])


def downgrade() -> None:
    op.drop_table("product_vectors")
    op.drop_table("products")
