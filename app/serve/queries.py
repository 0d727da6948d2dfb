"""The database reads and writes of serving an event and embedding a video.

What :mod:`app.serve.recommend` composes: find the event, find the query video, load its
embedding, store a new embedding, and store the event's one recommendation. Each function
takes ``session`` keyword-only, may flush, and never commits: the caller owns the
transaction. ``find_*`` returns None for a missing row, ``get_*`` raises
``sqlalchemy.exc.NoResultFound``.

Inserts that workers may race on (a redelivered message served twice at once) run in a
savepoint, so that losing the race keeps the other worker's row and the transaction.
Writes that live with another step are theirs: registering a video
(:func:`app.media.register.register`), the outbox row
(:func:`app.deliver.outbox.create_delivery`), the active model
(:func:`app.learn.registry.active_model`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import and_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached, undefer

from app.db import dialect_insert
from app.index import frames as index_frames
from app.learn.registry import active_model
from app.models import Delivery, Embedding, Event, ModelVersion, Recommendation, Video, utcnow
from app.serve.embedding_jobs import given_up_ids
from app.serve.events import VideoSelected

logger = logging.getLogger(__name__)


def find_event(event_id: str, *, session: Session) -> Event | None:
    return session.get(Event, event_id)


def get_event(event_id: str, *, session: Session) -> Event:
    return session.get_one(Event, event_id)


def record_event(event: VideoSelected, *, session: Session) -> Event | None:
    """Records a valid event once by its id, whichever worker records it first: the new
    row when this call recorded it, None when it was recorded before. One statement: the
    row is inserted unless present, and the object that stands for it is put in the
    session as loaded, not read back."""
    values = _event_values(event)
    inserted = session.scalar(
        dialect_insert(session)(Event)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(Event.event_id)
    )
    if inserted is None:
        logger.info("event %s already recorded", event.event_id)
        return None
    ev = _loaded_event(values)
    session.add(ev)
    return ev


# --------------------------------------------------------------------------- the warm path
#
# A warm event (a library video already embedded by the active model) is most events, and
# on Postgres it takes two statements here instead of eight: one records the event and
# reads what its search needs, one stores its recommendation, its outbox row and its
# status. They are SQL sent on the session's connection as it is: SQLAlchemy's work per
# ORM statement (building, cache keys, the unit of work, loading objects) was two thirds
# of a warm event's CPU, several times the round trip itself. Anything else (an event
# recorded before, a video not embedded, a fresh install, SQLite) takes the general path.


@dataclass(frozen=True)
class WarmQuery:
    """What a search for a just-recorded event needs: its query video, the active model,
    and the video's embedding by it (float32 vector bytes, float16 frame descriptors and
    their times, as stored)."""

    video_id: int
    video_uri: str
    model_id: int
    vector: bytes
    frame_dim: int | None
    frame_vectors: bytes | None
    frame_times: bytes | None


# Records the event unless present, and reads its video, the active model and the
# video's embedding by it. The read does not see the row just inserted (one snapshot for
# the whole statement), and needs none of it.
_RECORD_AND_READ = """
WITH recorded AS (
    INSERT INTO events (event_id, payload, k, callback_url, status, attempts, received_at)
    VALUES (%(event_id)s, %(payload)s::jsonb, %(k)s, %(callback_url)s, 'received', 0, %(received_at)s)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
)
SELECT (SELECT count(*) FROM recorded), v.id, v.uri, v.status, m.id,
       e.vector, e.frame_dim, e.frame_vectors, e.frame_times
FROM (SELECT %(video_id)s::bigint AS id) AS q
LEFT JOIN videos AS v ON v.id = q.id
LEFT JOIN model_versions AS m ON m.is_active
LEFT JOIN embeddings AS e ON e.video_id = v.id AND e.model_version_id = m.id
"""


def warm_path(session: Session) -> bool:
    """Whether the session's database takes the warm path's statements (Postgres)."""
    return session.get_bind().dialect.name == "postgresql"


def record_warm_event(event: VideoSelected, *, session: Session) -> WarmQuery | Event | None:
    """:func:`record_event` for an event naming a video by id, on Postgres, with the reads
    of its search in the same statement. Returns what the search needs; or the new row
    (put in the session) when the event cannot be searched at once (its video is unknown,
    failed or not embedded, or no model is active: the general path answers it); or None
    when it was recorded before."""
    assert event.video_id is not None
    values = _event_values(event)
    cursor = session.connection().connection.driver_connection.cursor(binary=True)  # type: ignore[union-attr]
    row = cursor.execute(
        _RECORD_AND_READ, {**values, "payload": json.dumps(values["payload"]), "video_id": event.video_id}
    ).fetchone()
    assert row is not None  # one row, whatever is found
    fresh, video_id, uri, status, model_id, vector, frame_dim, frame_vectors, frame_times = row
    if not fresh:
        logger.info("event %s already recorded", event.event_id)
        return None
    if video_id is None or status == "failed" or vector is None:
        ev = _loaded_event(values)
        session.add(ev)
        return ev
    return WarmQuery(video_id, uri, model_id, bytes(vector), frame_dim,
                     frame_vectors and bytes(frame_vectors), frame_times and bytes(frame_times))  # fmt: skip


# The recommendation, unless the event has one (a redelivered message served at the same
# time: the other transaction's insert is waited for, then nothing is done), and only if it
# was stored, the event's status and its outbox delivery, leased to this caller.
_STORE_ANSWER = """
WITH answer AS (
    INSERT INTO recommendations (event_id, query_video_id, model_version_id, index_version_id, results,
                                 search_ms, created_at)
    VALUES (%(event_id)s, %(video_id)s, %(model_id)s, %(index_version_id)s, %(results)s::jsonb,
            %(search_ms)s, %(now)s)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING id
), served AS (
    UPDATE events SET video_id = %(video_id)s, status = 'served', error = NULL, completed_at = %(now)s
    FROM answer WHERE events.event_id = %(event_id)s
), delivery AS (
    INSERT INTO deliveries (recommendation_id, url, webhook_id, body, status, attempts, next_attempt_at,
                            lease_until, created_at)
    SELECT answer.id, %(url)s, %(webhook_id)s, %(body)s, 'pending', 0, %(now)s, %(lease_until)s, %(now)s
    FROM answer
    RETURNING id
)
SELECT delivery.id FROM delivery
"""


def store_warm_answer(
    event_id: str,
    *,
    session: Session,
    query: WarmQuery,
    index_version_id: int | None,
    results: list[dict[str, Any]],
    search_ms: float,
    url: str,
    webhook_id: str,
    body: str,
    lease_until: datetime,
) -> int | None:
    """Stores a served event's one recommendation, its status and its outbox delivery
    (pending, due now, leased until ``lease_until``) in one statement; returns the
    delivery's id, or None when another worker answered the event first (nothing is
    written then: :func:`find_recommendation` reads theirs)."""
    now = utcnow()
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    row = cursor.execute(
        _STORE_ANSWER,
        {
            "event_id": event_id,
            "video_id": query.video_id,
            "model_id": query.model_id,
            "index_version_id": index_version_id,
            "results": json.dumps({"items": results}),
            "search_ms": search_ms,
            "now": now,
            "url": url,
            "webhook_id": webhook_id,
            "body": body,
            "lease_until": lease_until,
        },
    ).fetchone()
    return None if row is None else int(row[0])


def _event_values(event: VideoSelected) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "payload": event.model_dump(exclude_none=True),
        "k": event.k,
        "callback_url": event.callback_url,
        "status": "received",
        "attempts": 0,
        "received_at": utcnow(),
    }


def _loaded_event(values: dict[str, Any]) -> Event:
    """The object for an events row as just inserted with ``values``: put in the session
    as loaded (persistent once added), with no SELECT."""
    ev = Event(**values, video_id=None, error=None, completed_at=None)
    make_transient_to_detached(ev)
    return ev


def record_rejected_event(event_id: str, *, raw: object, callback_url: str, reason: str, session: Session) -> Event:
    """Records a malformed event as failed, keeping (the start of) what was received."""
    ev = Event(
        event_id=event_id,
        payload={"raw": repr(raw)[:2000]},
        k=0,
        callback_url=callback_url,
        status="failed",
        error=reason,
    )
    session.add(ev)
    session.flush()
    return ev


def find_video(video_id: int, *, session: Session) -> Video | None:
    return session.get(Video, video_id)


def get_video(video_id: int, *, session: Session) -> Video:
    return session.get_one(Video, video_id)


def model_to_embed_with(model_id: int | None, *, session: Session) -> ModelVersion:
    """``model_id`` (a model warming up), or the active model when it is None."""
    return session.get_one(ModelVersion, model_id) if model_id is not None else active_model(session=session)


def find_embedding(video_id: int, model_id: int, *, session: Session) -> Embedding | None:
    """A video's embedding by one model: the query vector of a search, with its frame
    descriptors (the second stage's query) in the same read."""
    return session.scalar(
        select(Embedding)
        .where(Embedding.video_id == video_id, Embedding.model_version_id == model_id)
        .options(undefer(Embedding.frame_vectors), undefer(Embedding.frame_times))
    )


def query_embedding(video_id: int, *, session: Session) -> tuple[ModelVersion, Embedding | None]:
    """The active model and the video's embedding by it (None: not embedded yet): the
    query vector of a search, with its frame descriptors. One statement, which also
    tells whether the active model changed (:func:`model_version`)."""
    row = session.execute(
        select(ModelVersion.id, Embedding)
        .outerjoin(Embedding, and_(Embedding.model_version_id == ModelVersion.id, Embedding.video_id == video_id))
        .where(ModelVersion.is_active)
        .options(undefer(Embedding.frame_vectors), undefer(Embedding.frame_times))
    ).first()
    if row is None:  # a fresh install: the untrained model, made active now
        model = active_model(session=session)
        return model, find_embedding(video_id, model.id, session=session)
    return model_version(row[0], session=session), row[1]


# Model versions by id, loaded once per process and detached: what serving reads of one
# (name, dim, config, trained) never changes once it is registered; which one is active
# is read with each event's embedding.
_model_versions: dict[int, ModelVersion] = {}


def model_version(model_id: int, *, session: Session) -> ModelVersion:
    """A model version, read-only (its serving fields), cached for the process."""
    model = _model_versions.get(model_id)
    if model is None:
        model = session.get_one(ModelVersion, model_id)
        session.expunge(model)
        _model_versions[model_id] = model
    return model


def has_embedding(video_id: int, model_id: int, *, session: Session) -> bool:
    found = session.scalar(
        select(Embedding.id).where(Embedding.video_id == video_id, Embedding.model_version_id == model_id)
    )
    return found is not None


def add_embedding(
    video_id: int,
    model_id: int,
    vector: np.ndarray,
    *,
    frames: int,
    session: Session,
    frame_vectors: np.ndarray | None = None,
    frame_times: np.ndarray | None = None,
) -> None:
    """Stores a video's (D,) embedding by one model, with its (T, F) frame descriptors
    and their (T,) times when given, unless a worker stored it concurrently."""
    packed: tuple[bytes | None, bytes | None] = (None, None)
    if frame_vectors is not None:
        if frame_times is None:
            raise ValueError("frame descriptors need their times")
        packed = index_frames.pack(frame_vectors, frame_times)
    try:
        with session.begin_nested():
            session.add(
                Embedding(
                    video_id=video_id,
                    model_version_id=model_id,
                    vector=vector.astype("float32").tobytes(),
                    dim=int(vector.shape[0]),
                    frames=frames,
                    frame_dim=int(frame_vectors.shape[1]) if frame_vectors is not None else None,
                    frame_vectors=packed[0],
                    frame_times=packed[1],
                )
            )
    except IntegrityError:
        pass  # embedded concurrently by a redelivered message; theirs is equivalent


def videos_without_embedding(model_id: int, *, limit: int | None, session: Session) -> list[int]:
    """Enabled library videos, not failed, that have no embedding by the model and were
    not given up for it (:mod:`app.serve.embedding_jobs`); by id."""
    done = select(Embedding.video_id).where(Embedding.model_version_id == model_id)
    stmt = (
        select(Video.id)
        .where(Video.in_library, Video.enabled, Video.status != "failed", Video.id.not_in(done))
        .where(Video.id.not_in(given_up_ids(model_id)))
        .order_by(Video.id)
    )
    if limit:
        stmt = stmt.limit(limit)
    return list(session.scalars(stmt))


def find_recommendation(event_id: str, *, session: Session) -> Recommendation | None:
    """An event's one recommendation, if it has been answered."""
    return session.scalar(select(Recommendation).where(Recommendation.event_id == event_id))


def add_recommendation(rec: Recommendation, *, session: Session, contended: bool = True) -> Recommendation:
    """Stores an event's one recommendation and returns it; or, when another worker stored
    one first (a redelivered message served concurrently), returns theirs. An event this
    transaction recorded is not ``contended``: another worker's transaction waits on its
    row until this one ends, then finds this recommendation; no savepoint is needed."""
    if not contended:
        session.add(rec)
        session.flush()
        return rec
    try:
        with session.begin_nested():
            session.add(rec)
            session.flush()
    except IntegrityError:
        return session.scalars(select(Recommendation).where(Recommendation.event_id == rec.event_id)).one()
    return rec


def find_delivery(recommendation_id: int, *, session: Session) -> Delivery | None:
    """A recommendation's outbox delivery (none when the event gave no callback URL)."""
    return session.scalar(select(Delivery).where(Delivery.recommendation_id == recommendation_id))
