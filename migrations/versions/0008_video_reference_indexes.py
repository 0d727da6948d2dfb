"""indexes on the columns that reference videos

Postgres checks every row that references a video when the video is deleted, and without
an index on the referencing column each check is a scan of the whole table: deleting
100,000 scratch videos of a benchmark beside 64,000 events took over six minutes and
held its locks meanwhile (an index rebuild waited on them). ``embedding_jobs``' key
starts with the model, so it cannot serve a lookup by video either.

Revision ID: 0008_video_reference_indexes
Revises: 0007_frame_descriptors
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008_video_reference_indexes"
down_revision: str | None = "0007_frame_descriptors"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = (
    ("ix_events_video_id", "events", "video_id"),
    ("ix_recommendations_query_video_id", "recommendations", "query_video_id"),
    ("ix_embedding_jobs_video_id", "embedding_jobs", "video_id"),
)


def upgrade() -> None:
    for name, table, column in INDEXES:
        op.create_index(name, table, [column])


def downgrade() -> None:
    for name, table, _ in INDEXES:
        op.drop_index(name, table_name=table)
