"""index watermark by commit, not by id: embedding stamps, an index horizon, listing triggers

An index version recorded the newest embedding id it held and searched ids above it
beside the file. Ids come from a sequence at insert, not at commit, so an embedding
whose transaction took a lower id and committed after a higher one was in neither.
Each embedding now carries a stamp (``xact``) and each version the horizon it was built
at: every embedding stamped below the horizon was committed before the build read, so
only those stamped at or above it can be missing from the file.

- Postgres: the stamp is the writing transaction's id (``pg_current_xact_id()``), the
  horizon the xmin of the build's snapshot (every transaction below it had finished).
- SQLite (embedded, one writer at a time): the stamp counts writes (the model's highest
  stamp + 1, set by a trigger), the horizon is the highest stamp read + 1.

A video that becomes an enabled library video (a query-only video added to the library,
a disabled one enabled) has its embeddings stamped again by a trigger, so it enters the
fresh embeddings searched beside the index at once: the index holds library videos only.

Existing rows: embeddings newer than their model's newest index version get stamp 1 and
every existing version horizon 1, so what each version lacked is still searched beside
it; the others stamp 0.

Revision ID: 0006_index_snapshot
Revises: 0005_training_runs
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_index_snapshot"
down_revision: str | None = "0005_training_runs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NEWER_THAN_INDEX = """
    e.id > COALESCE((SELECT iv.embedding_watermark FROM index_versions iv
                     WHERE iv.model_version_id = e.model_version_id ORDER BY iv.id DESC LIMIT 1), 0)
"""
# A video became recommendable: in the library and enabled, and not both before.
_LISTED = "NEW.in_library AND NEW.enabled AND NOT (OLD.in_library AND OLD.enabled)"

_POSTGRES_UP = [
    f"UPDATE embeddings e SET xact = CASE WHEN {_NEWER_THAN_INDEX} THEN 1 ELSE 0 END",
    "ALTER TABLE embeddings ALTER COLUMN xact SET DEFAULT pg_current_xact_id()::text::bigint",
    "ALTER TABLE embeddings ALTER COLUMN xact SET NOT NULL",
    """CREATE FUNCTION vidsim_video_listed() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
           UPDATE embeddings SET xact = pg_current_xact_id()::text::bigint WHERE video_id = NEW.id;
           RETURN NULL;
       END $$""",
    f"""CREATE TRIGGER videos_listed AFTER UPDATE OF in_library, enabled ON videos
        FOR EACH ROW WHEN ({_LISTED}) EXECUTE FUNCTION vidsim_video_listed()""",
]
_POSTGRES_DOWN = ["DROP TRIGGER videos_listed ON videos", "DROP FUNCTION vidsim_video_listed()"]

_SQLITE_NEXT_STAMP = (
    "(SELECT COALESCE(MAX(s.xact), 0) + 1 FROM embeddings s WHERE s.model_version_id = embeddings.model_version_id)"
)
_SQLITE_UP = [
    f"UPDATE embeddings AS e SET xact = CASE WHEN {_NEWER_THAN_INDEX} THEN 1 ELSE 0 END",
    f"""CREATE TRIGGER embeddings_stamped AFTER INSERT ON embeddings
        BEGIN UPDATE embeddings SET xact = {_SQLITE_NEXT_STAMP} WHERE id = NEW.id; END""",
    f"""CREATE TRIGGER videos_listed AFTER UPDATE OF in_library, enabled ON videos WHEN {_LISTED}
        BEGIN UPDATE embeddings SET xact = {_SQLITE_NEXT_STAMP} WHERE video_id = NEW.id; END""",
]
_SQLITE_DOWN = ["DROP TRIGGER videos_listed", "DROP TRIGGER embeddings_stamped"]


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.add_column("embeddings", sa.Column("xact", sa.BigInteger(), nullable=True))
    op.add_column("index_versions", sa.Column("horizon", sa.BigInteger(), nullable=False, server_default="1"))
    for statement in _POSTGRES_UP if postgres else _SQLITE_UP:
        op.execute(statement)
    # The fresh embeddings of a model are read by stamp on every search; collections are
    # counted before their search.
    op.create_index("embeddings_fresh", "embeddings", ["model_version_id", "xact"])
    op.create_index("ix_videos_collection", "videos", ["collection"])


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for statement in _POSTGRES_DOWN if postgres else _SQLITE_DOWN:
        op.execute(statement)
    op.drop_index("ix_videos_collection", table_name="videos")
    op.drop_index("embeddings_fresh", table_name="embeddings")
    with op.batch_alter_table("index_versions") as batch_op:
        batch_op.drop_column("horizon")
    with op.batch_alter_table("embeddings") as batch_op:
        batch_op.drop_column("xact")
