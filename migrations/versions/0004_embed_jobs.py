"""embedding jobs: per (model, video) requests and failures of embeddings

A rollout records when it asked a worker for each embedding, so that it can ask again
for what is still missing (a video added while the model warms, a lost message); every
embedding task that fails for good counts an attempt, and after
VIDSIM_EMBED_MAX_ATTEMPTS the video is given up for that model instead of being
embedded again and again.

Revision ID: 0004_embed_jobs
Revises: 0003_embedding_storage
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_embed_jobs"
down_revision: str | None = "0003_embedding_storage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "embedding_jobs",
        sa.Column("model_version_id", _ID, nullable=False),
        sa.Column("video_id", _ID, nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("given_up", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["video_id"], ["videos.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_version_id", "video_id"),
    )


def downgrade() -> None:
    op.drop_table("embedding_jobs")
