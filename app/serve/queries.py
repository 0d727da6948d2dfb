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

import logging
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
    values: dict[str, Any] = {
        "event_id": event.event_id,
        "payload": event.model_dump(exclude_none=True),
        "k": event.k,
        "callback_url": event.callback_url,
        "status": "received",
        "attempts": 0,
        "received_at": utcnow(),
    }
    inserted = session.scalar(
        dialect_insert(session)(Event)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(Event.event_id)
    )
    if inserted is None:
        logger.info("event %s already recorded", event.event_id)
        return None
    ev = Event(**values, video_id=None, error=None, completed_at=None)
    make_transient_to_detached(ev)  # the row as just inserted: persistent once added, no SELECT
    session.add(ev)
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
