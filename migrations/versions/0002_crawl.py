"""crawler: sources, items, runs, training requests

Revision ID: 0002_crawl
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_crawl"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
HOLDS_CONTENT = "state IN ('fetched', 'preprocessed')"


def upgrade() -> None:
    op.create_table(
        "crawl_sources",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("options", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_crawled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "crawl_runs",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("counts", JSON, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "crawled_items",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("source_id", BIG_ID, nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("page_url", sa.Text(), nullable=True),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reject_code", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=True),
        sa.Column("duplicate_of_id", BIG_ID, nullable=True),
        sa.Column("local_path", sa.Text(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("head_fp", sa.LargeBinary(), nullable=True),
        sa.Column("tail_fp", sa.LargeBinary(), nullable=True),
        sa.Column("trimmed", JSON, nullable=False),
        sa.Column("clean_path", sa.Text(), nullable=True),
        sa.Column("clean_duration_s", sa.Float(), nullable=True),
        sa.Column("run_id", BIG_ID, nullable=True),
        sa.Column("discovered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("preprocessed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["source_id"], ["crawl_sources.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["duplicate_of_id"], ["crawled_items.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["run_id"], ["crawl_runs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("crawled_items", schema=None) as batch_op:
        batch_op.create_index("crawled_items_source_url", ["source_id", "url"], unique=True)
        batch_op.create_index("crawled_items_state", ["state", "source_id"], unique=False)
        batch_op.create_index(
            "crawled_items_one_copy",
            ["content_hash"],
            unique=True,
            postgresql_where=sa.text(HOLDS_CONTENT),
            sqlite_where=sa.text(HOLDS_CONTENT),
        )
    op.create_table(
        "crawl_training_requests",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("new_items", sa.Integer(), nullable=False),
        sa.Column("item_watermark", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("task_id", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("crawl_training_requests")
    with op.batch_alter_table("crawled_items", schema=None) as batch_op:
        batch_op.drop_index(
            "crawled_items_one_copy",
            sqlite_where=sa.text(HOLDS_CONTENT),
            postgresql_where=sa.text(HOLDS_CONTENT),
        )
        batch_op.drop_index("crawled_items_state")
        batch_op.drop_index("crawled_items_source_url")
    op.drop_table("crawled_items")
    op.drop_table("crawl_runs")
    op.drop_table("crawl_sources")
