"""frame-level descriptors beside each embedding: the second stage of a search

Each embedding row may carry the video's frame descriptors from the same forward pass
(``frame_vectors``: float16 (T, frame_dim) row-major, one per sampled frame) and the
presentation time of each frame (``frame_times``: float32 (T,), seconds). Rows written
before have neither: their videos are ranked by the video vector alone. The columns are
added in place (no table rebuild), so the stamp triggers of 0006 stay.

Revision ID: 0007_frame_descriptors
Revises: 0006_index_snapshot
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_frame_descriptors"
down_revision: str | None = "0006_index_snapshot"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("embeddings", sa.Column("frame_dim", sa.Integer(), nullable=True))
    op.add_column("embeddings", sa.Column("frame_vectors", sa.LargeBinary(), nullable=True))
    op.add_column("embeddings", sa.Column("frame_times", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    for column in ("frame_times", "frame_vectors", "frame_dim"):
        op.drop_column("embeddings", column)
