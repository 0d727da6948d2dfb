"""The index's reads and writes of the database: the embeddings a version is built from
and the fresh ones searched beside it, the stored vectors candidates are re-ranked with,
the frame descriptors of the second stage and its background sample,
which candidates may be recommended, and the ``IndexVersion`` rows. Each takes the
caller's ``session`` and never commits (the caller owns the transaction)."""

from __future__ import annotations

import functools

import numpy as np
from sqlalchemy import (
    BigInteger,
    BindParameter,
    ColumnElement,
    Select,
    Text,
    and_,
    bindparam,
    cast,
    func,
    select,
    update,
)
from sqlalchemy.orm import Session, aliased

from app.index import frames
from app.index.frames import Frames
from app.models import Embedding, IndexVersion, ModelVersion, Video

# Ids bound in one SQLite query (it takes at most 32,766 parameters).
_IDS_PER_READ = 10_000


# --------------------------------------------------------------------------- embeddings
#
# An index version holds the embeddings of enabled library videos its build read; those
# stamped (``Embedding.xact``) at or above the version's horizon may have committed after
# that read, so they are searched exactly beside the file. Videos seen only in events
# (query-only) and disabled ones are in neither.


def _listed(model_id: int | BindParameter[int]) -> ColumnElement[bool]:
    """The model's embeddings of videos that may be recommended (join ``Video``)."""
    return and_(Embedding.model_version_id == model_id, Video.in_library, Video.enabled)


def _horizon(dialect: str, model_id: int | BindParameter[int]) -> ColumnElement[int]:
    """The horizon of the statement it is part of: every embedding of the model stamped
    below it was committed before the statement's snapshot, so the statement sees it."""
    if dialect == "postgresql":
        # The snapshot's xmin: every transaction below it had finished (committed or not).
        return cast(cast(func.pg_snapshot_xmin(func.pg_current_snapshot()), Text), BigInteger)
    # SQLite has one writer at a time and stamps count the model's writes (migration 0004).
    written = aliased(Embedding)
    return (
        select(func.coalesce(func.max(written.xact), 0) + 1)
        .where(written.model_version_id == model_id)
        .scalar_subquery()
    )


def snapshot_horizon(*, session: Session, model_id: int) -> int:
    """The horizon now (see ``_horizon``): what a build reading after it covers."""
    return int(session.scalar(select(_horizon(session.get_bind().dialect.name, model_id))) or 0)


def embedding_watermark(*, session: Session, model_id: int) -> int:
    """The newest embedding id of the model (0: none), recorded with a build as a figure."""
    newest = session.scalar(
        select(func.coalesce(func.max(Embedding.id), 0)).where(Embedding.model_version_id == model_id)
    )
    return int(newest or 0)


def library_embeddings(
    *, session: Session, model_id: int, dim: int, horizon: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """What a build holds: every embedding of the model's enabled library videos,
    streamed: video ids (N,) uint64 and vectors (N, dim) float32 in embedding-id order,
    and how many of them are stamped at or above ``horizon`` (they are also read as
    fresh, ``fresh_embeddings``, until the next build)."""
    listed = _listed(model_id)
    count = session.scalar(select(func.count()).select_from(Embedding).join(Video).where(listed)) or 0
    keys = np.zeros(count, dtype=np.uint64)
    vectors = np.zeros((count, dim), dtype=np.float32)  # (N, D), filled as rows stream in
    n = fresh = 0
    stream = session.execute(
        select(Embedding.video_id, Embedding.xact, Embedding.vector).join(Video).where(listed).order_by(Embedding.id),
        execution_options={"yield_per": 10_000},
    )
    for video_id, stamp, blob in stream:
        if n == len(keys):  # committed between the count and this read
            keys = np.concatenate([keys, np.zeros(max(16, n), dtype=np.uint64)])
            vectors = np.concatenate([vectors, np.zeros((max(16, n), dim), dtype=np.float32)])
        keys[n], vectors[n] = video_id, np.frombuffer(blob, dtype=np.float32)
        fresh += stamp is not None and stamp >= horizon
        n += 1
    return keys[:n], vectors[:n], fresh


def fresh_embeddings(
    *, session: Session, model_id: int, since: int, held: list[int]
) -> tuple[list[tuple[int, int, bytes]], int | None]:
    """(video id, stamp, vector bytes) of the model's embeddings of enabled library
    videos stamped at or above ``since`` (what an index built at horizon ``since`` may
    lack), but none of the ``held`` videos (read before, still inside the window); and
    this read's horizon, to read from next time (None: nothing came back). One statement."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # On every search: the SQL sent on the connection as it is, in binary (vectors as
        # raw bytes), without SQLAlchemy's work per statement (several times the read's).
        cursor = session.connection().connection.driver_connection.cursor(binary=True)  # type: ignore[union-attr]
        rows = cursor.execute(_FRESH_SQL, {"model_id": model_id, "since": since, "held": held}).fetchall()
    else:
        rows = list(session.execute(_fresh_statement(dialect), {"model_id": model_id, "since": since, "held": held}))
    # (stamps are never None here: each passed ``>= since``)
    return [(video_id, stamp or 0, vector) for video_id, stamp, vector, _ in rows], (rows[0][3] if rows else None)


# ``_fresh_statement`` on Postgres; its horizon is ``_horizon``'s.
_FRESH_SQL = """
SELECT e.video_id, e.xact, e.vector, pg_snapshot_xmin(pg_current_snapshot())::text::bigint
FROM embeddings AS e JOIN videos AS v ON v.id = e.video_id
WHERE e.model_version_id = %(model_id)s AND v.in_library AND v.enabled
  AND e.xact >= %(since)s AND e.video_id <> ALL(%(held)s::bigint[])
"""


@functools.cache
def _fresh_statement(dialect: str) -> Select[int, int | None, bytes, int]:
    """``fresh_embeddings``'s statement, built once: it runs on every search, and building
    it took longer than running it (measured 0.56 ms a read built each time, 0.34 ms
    built once, on 20k embeddings with none fresh)."""
    model_id: BindParameter[int] = bindparam("model_id", type_=BigInteger)
    return (
        select(Embedding.video_id, Embedding.xact, Embedding.vector, _horizon(dialect, model_id))
        .join(Video)
        .where(
            _listed(model_id),
            Embedding.xact >= bindparam("since", type_=BigInteger),
            Embedding.video_id.not_in(bindparam("held", expanding=True)),
        )
    )


def collection_members(*, session: Session, model_id: int, collection: str, limit: int | None) -> dict[int, str]:
    """The uri of the enabled library videos of ``collection`` embedded by the model, by
    id (at most ``limit``)."""
    rows = session.execute(
        select(Video.id, Video.uri)
        .join(Embedding, Embedding.video_id == Video.id)
        .where(_listed(model_id), Video.collection == collection)
        .order_by(Video.id)
        .limit(limit)
    )
    return {video_id: uri for video_id, uri in rows}


def stored_vectors(*, session: Session, model_id: int, dim: int, video_ids: np.ndarray) -> np.ndarray:
    """The stored embeddings of ``video_ids`` under model ``model_id``: float32
    (len(video_ids), dim) in that order, NaN rows for videos without one (what an index
    that re-ranks from the database reads, ``app.index.version.VectorsOf``)."""
    out = np.full((len(video_ids), dim), np.nan, dtype=np.float32)
    row_of = {int(v): i for i, v in enumerate(video_ids)}
    ids = list(row_of)
    if not ids:
        return out
    if session.get_bind().dialect.name == "postgresql":
        # One array parameter, results in binary: bytea as raw bytes rather than hex text
        # (100 rows of 2 KB measured 1.6 ms against 2.7 ms through the text protocol).
        cursor = session.connection().connection.driver_connection.cursor(binary=True)  # type: ignore[union-attr]
        found = cursor.execute(
            "SELECT video_id, vector FROM embeddings WHERE model_version_id = %s AND video_id = ANY(%s)",
            (model_id, ids),
        ).fetchall()
    else:
        found = []
        for start in range(0, len(ids), _IDS_PER_READ):
            found += session.execute(
                select(Embedding.video_id, Embedding.vector).where(
                    Embedding.model_version_id == model_id, Embedding.video_id.in_(ids[start : start + _IDS_PER_READ])
                )
            ).all()
    for video_id, vector in found:
        out[row_of[video_id]] = np.frombuffer(vector, dtype=np.float32)
    return out


def stored_frames(*, session: Session, model_id: int, video_ids: list[int]) -> dict[int, Frames]:
    """The frame descriptors of ``video_ids`` under model ``model_id`` (the second stage's
    candidates), one statement; videos without them (older rows) are absent."""
    if not video_ids:
        return {}
    if session.get_bind().dialect.name == "postgresql":
        # Binary results, as stored_vectors: 64 candidates' frames are a megabyte, which
        # the text protocol would send as hex and decode again.
        cursor = session.connection().connection.driver_connection.cursor(binary=True)  # type: ignore[union-attr]
        rows = cursor.execute(
            "SELECT video_id, frame_dim, frame_vectors, frame_times FROM embeddings"
            " WHERE model_version_id = %s AND video_id = ANY(%s) AND frame_vectors IS NOT NULL",
            (model_id, list(video_ids)),
        ).fetchall()
    else:
        rows = session.execute(
            select(Embedding.video_id, Embedding.frame_dim, Embedding.frame_vectors, Embedding.frame_times)
            .where(Embedding.model_version_id == model_id, Embedding.video_id.in_(video_ids))
            .where(Embedding.frame_vectors.is_not(None))
        ).all()
    return {video_id: frames.unpack(bytes(v), t and bytes(t), dim) for video_id, dim, v, t in rows if v and dim}


def background_frames(*, session: Session, model_id: int, limit: int) -> list[np.ndarray]:
    """The frame descriptors of up to ``limit`` enabled library videos of the model, the
    same ones in every process (ordered by a hash of the video id, not by insertion)."""
    spread = (Embedding.video_id * 2654435761) % 4294967291
    rows = session.execute(
        select(Embedding.frame_dim, Embedding.frame_vectors)
        .join(Video)
        .where(_listed(model_id), Embedding.frame_vectors.is_not(None))
        .order_by(spread, Embedding.video_id)
        .limit(limit)
    )
    return [frames.unpack(v, None, dim).vectors for dim, v in rows if v and dim]


_ELIGIBLE_SQL = "SELECT id, uri FROM videos WHERE id = ANY(%(ids)s::bigint[]) AND in_library AND enabled"
_ELIGIBLE_IN_COLLECTION_SQL = _ELIGIBLE_SQL + " AND collection = %(collection)s"


def eligible_videos(*, session: Session, video_ids: list[int], collection: str | None) -> dict[int, str]:
    """The uri of each of ``video_ids`` that may be recommended: in the library, enabled,
    and in ``collection`` when given."""
    if not video_ids:
        return {}
    if session.get_bind().dialect.name == "postgresql":
        # On every search, as ``fresh_embeddings``: one array parameter, the SQL as it is.
        cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
        rows = cursor.execute(
            _ELIGIBLE_SQL if collection is None else _ELIGIBLE_IN_COLLECTION_SQL,
            {"ids": video_ids, "collection": collection},
        )
        return {video_id: uri for video_id, uri in rows}
    stmt = select(Video.id, Video.uri).where(Video.id.in_(video_ids), Video.in_library, Video.enabled)
    if collection is not None:
        stmt = stmt.where(Video.collection == collection)
    return {video_id: uri for video_id, uri in session.execute(stmt)}


# --------------------------------------------------------------------------- index versions


def version_to_serve(*, session: Session, model_id: int) -> IndexVersion | None:
    """The model's active index version, else its newest. (One index is active across
    all models: building one for a warming model deactivates the serving model's, which
    must not fall back to an exact scan of every embedding.)"""
    return session.scalar(
        select(IndexVersion)
        .where(IndexVersion.model_version_id == model_id)
        .order_by(IndexVersion.is_active.desc(), IndexVersion.id.desc())
        .limit(1)
    )


def older_versions(*, session: Session, model_id: int, below_id: int, limit: int) -> list[IndexVersion]:
    """The model's ``limit`` newest index versions older than ``below_id``, newest first."""
    return list(
        session.scalars(
            select(IndexVersion)
            .where(IndexVersion.model_version_id == model_id, IndexVersion.id < below_id)
            .order_by(IndexVersion.id.desc())
            .limit(limit)
        )
    )


def embeddings_since_index(*, session: Session, model: ModelVersion) -> tuple[IndexVersion | None, int]:
    """The model's active index version (None: never built) and how many embeddings of
    enabled library videos that build does not hold (searched exactly until the next):
    those stamped at or above its horizon, less the ones among them its build read."""
    version = session.scalar(
        select(IndexVersion).where(IndexVersion.is_active, IndexVersion.model_version_id == model.id)
    )
    since, in_file = (version.horizon, int(version.params.get("fresh_in_file", 0))) if version is not None else (0, 0)
    fresh = session.scalar(
        select(func.count()).select_from(Embedding).join(Video).where(_listed(model.id), Embedding.xact >= since)
    )
    return version, max(0, int(fresh or 0) - in_file)


def deactivate_versions(*, session: Session) -> None:
    """No index version is active any more (until the caller adds the new one)."""
    session.execute(update(IndexVersion).where(IndexVersion.is_active).values(is_active=False))
    session.flush()


def version_paths(*, session: Session) -> list[tuple[int, str]]:
    """(id, path) of every index version, newest first."""
    rows = session.execute(select(IndexVersion.id, IndexVersion.path).order_by(IndexVersion.id.desc()))
    return [(version_id, path) for version_id, path in rows]
