"""The one place that composes an answer: event -> query video -> embedding -> search ->
recommendation -> outbox delivery.

Functions here take ``session`` keyword-only and never commit; they return what the
caller (a Celery task, the demo) must enqueue next once it has committed. No function
waits on another piece of work: an event whose video is not fetched or not embedded yet
is parked, and served again by the fetching or embedding step. Those two steps take
``sessions`` (a unit-of-work factory) instead: a download, a decode or a forward pass
runs between short transactions, never inside one. The reads and writes they compose
are in :mod:`app.serve.queries`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.db import Sessions
from app.deliver import outbox
from app.index import frames as index_frames
from app.index.search import Match, search_library, vector_of
from app.learn.registry import describe_stream
from app.media import register as library
from app.media import video as video_io
from app.metrics import EVENTS
from app.models import Embedding, Event, ModelVersion, Recommendation, Video, utcnow
from app.serve import embedding_jobs, queries
from app.serve.events import InvalidEvent, VideoSelected, parse_event

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What to do after commit: fetching the event's video from ``fetch_uri`` (then
    serve the event again), an embedding of ``embed_video_id`` (likewise), or an attempt
    of ``delivery_id``: a new one comes ``leased`` to the caller for its first attempt
    (``outbox.attempt_leased``, or a task handed the lease)."""

    event_id: str
    embed_video_id: int | None = None
    delivery_id: int | None = None
    fetch_uri: str | None = None
    leased: outbox.Leased | None = None


def accept_event(raw: Any, *, session: Session, settings: Settings, fallback_id: str) -> Outcome:
    """Records a published event once (by event id) and serves it if it can be served now.
    A malformed event is recorded as failed with its reason (and answered with an error
    callback if it names a usable callback URL)."""
    try:
        event = parse_event(raw, max_k=settings.max_k)
    except InvalidEvent as exc:
        return _reject(raw, str(exc), fallback_id=fallback_id, session=session)
    if event.video_id is not None and queries.warm_path(session):
        recorded = queries.record_warm_event(event, session=session)
        if isinstance(recorded, queries.WarmQuery):
            return _serve_warm(recorded, event, session=session, settings=settings)
    else:
        recorded = queries.record_event(event, session=session)
    if recorded is None:  # recorded before: a redelivered or republished message
        return serve_event(event.event_id, session=session, settings=settings)
    return _serve(recorded, event, session=session, settings=settings, fresh=True)


def _serve_warm(query: queries.WarmQuery, event: VideoSelected, *, session: Session, settings: Settings) -> Outcome:
    """Answers a just-recorded event whose video is embedded by the active model: the
    search, then the recommendation, the event's status and its outbox delivery in one
    statement (:func:`queries.store_warm_answer`). What :func:`_serve` does for any
    event, without an ORM object on the way."""
    model = queries.model_version(query.model_id, session=session)
    frames = (
        index_frames.unpack(query.frame_vectors, query.frame_times, query.frame_dim)
        if query.frame_vectors is not None and query.frame_dim
        else None
    )
    started = time.perf_counter()
    matches, index_version = search_library(
        session=session,
        model=model,
        query=np.frombuffer(query.vector, dtype=np.float32),
        k=event.k,
        exclude={query.video_id},
        collection=event.collection,
        exclude_near_duplicates=event.exclude_near_duplicates,
        query_frames=frames,
        settings=settings,
    )
    results = [result_item(m, rank) for rank, m in enumerate(matches, start=1)]
    search_ms = (time.perf_counter() - started) * 1000
    answer = _body(event.event_id, query=(query.video_id, query.video_uri), model=model,
                   index_version=index_version, results=results, error=None)  # fmt: skip
    body = outbox.encode_body(answer)
    webhook_id = outbox.webhook_id_for(event.event_id)
    lease_until = utcnow() + timedelta(seconds=outbox.lease_s(settings))
    delivery_id = queries.store_warm_answer(
        event.event_id,
        session=session,
        query=query,
        index_version_id=index_version,
        results=results,
        search_ms=search_ms,
        url=event.callback_url,
        webhook_id=webhook_id,
        body=body,
        lease_until=lease_until,
    )
    if delivery_id is None:  # answered meanwhile by another worker (a redelivered message): keep theirs
        existing = queries.find_recommendation(event.event_id, session=session)
        assert existing is not None  # what stopped this one being stored
        return _existing_outcome(existing, session=session)
    EVENTS.labels("served").inc()
    leased = outbox.Leased(delivery_id, event.callback_url, webhook_id, body, lease_until)
    return Outcome(event.event_id, delivery_id=delivery_id, leased=leased)


def serve_event(event_id: str, *, session: Session, settings: Settings) -> Outcome:
    """Answers a recorded event, idempotently: an event already answered gets its
    existing delivery back, never a second recommendation."""
    ev = queries.get_event(event_id, session=session)
    existing = queries.find_recommendation(event_id, session=session)
    if existing is not None:
        return _existing_outcome(existing, session=session)
    return _serve(ev, VideoSelected.model_validate(ev.payload), session=session, settings=settings, fresh=False)


def _serve(ev: Event, event: VideoSelected, *, session: Session, settings: Settings, fresh: bool) -> Outcome:
    """Answers an event not answered yet; ``fresh``: recorded by this transaction, so no
    other worker can answer it meanwhile (:func:`queries.add_recommendation`). Nothing
    is flushed before the answer is (the event's video with its status, in one UPDATE):
    the reads in between need none of it."""
    with session.no_autoflush:
        return _serve_unflushed(ev, event, session=session, settings=settings, fresh=fresh)


def _serve_unflushed(ev: Event, event: VideoSelected, *, session: Session, settings: Settings, fresh: bool) -> Outcome:
    event_id = ev.event_id
    try:
        query_video = _query_video(ev, event, session=session, settings=settings)
    except library.SourceError as exc:
        return _answer(ev, error=str(exc), session=session, fresh=fresh)
    if isinstance(query_video, str):
        ev.status = "fetching"
        return Outcome(event_id, fetch_uri=query_video)
    if query_video.status == "failed":
        error = f"video {query_video.id}: {query_video.error}"
        return _answer(ev, query=query_video, error=error, session=session, fresh=fresh)

    model, emb = queries.query_embedding(query_video.id, session=session)
    if emb is None:
        refused = embedding_jobs.refusal(query_video.id, model, session=session)
        if refused is not None:  # not asked for again: it failed for good
            return _answer(ev, query=query_video, model=model, error=refused, session=session, fresh=fresh)
        ev.status = "embedding"
        return Outcome(event_id, embed_video_id=query_video.id)

    started = time.perf_counter()
    matches, index_version = search_library(
        session=session,
        model=model,
        query=vector_of(emb),
        k=ev.k,
        exclude={query_video.id},
        collection=event.collection,
        exclude_near_duplicates=event.exclude_near_duplicates,
        query_frames=_frames_of(emb),
    )
    results = [result_item(m, rank) for rank, m in enumerate(matches, start=1)]
    return _answer(
        ev,
        query=query_video,
        model=model,
        index_version=index_version,
        results=results,
        search_ms=(time.perf_counter() - started) * 1000,
        session=session,
        fresh=fresh,
    )


def _frames_of(emb: Embedding) -> index_frames.Frames | None:
    """The query's frame descriptors, or None for an embedding stored before them."""
    if emb.frame_vectors is None or not emb.frame_dim:
        return None
    return index_frames.unpack(emb.frame_vectors, emb.frame_times, emb.frame_dim)


def result_item(m: Match, rank: int) -> dict[str, Any]:
    """One result of the callback contract (README, "Callback contract")."""

    def seconds(span: tuple[float, float] | None, end: int) -> float | None:
        return None if span is None else round(span[end], 2)

    return {
        "video_id": m.video_id,
        "uri": m.uri,
        "score": round(m.score, 6),
        "match": None if m.match is None else round(m.match, 4),
        "calibrated": None if m.calibrated is None else round(m.calibrated, 4),
        "near_duplicate": m.near_duplicate,
        "rank": rank,
        "query_start_s": seconds(m.query_span, 0),
        "query_end_s": seconds(m.query_span, 1),
        "start_s": seconds(m.span, 0),
        "end_s": seconds(m.span, 1),
    }


def _query_video(ev: Event, event: VideoSelected, *, session: Session, settings: Settings) -> Video | str:
    """The event's video: a library video by id, or the file or URL it names once
    registered; else the URI to fetch it from (checked, but not read: reading waits on
    a disk or another host, and is done by :func:`fetch_query_video`)."""
    if ev.video_id is not None:
        return queries.get_video(ev.video_id, session=session)
    if event.video_id is not None:
        video = queries.find_video(event.video_id, session=session)
        if video is None:
            raise library.SourceError(f"unknown video id {event.video_id}")
    else:
        assert event.video_uri is not None
        uri, found = library.lookup(session, event.video_uri, settings=settings, restrict=True)
        if found is None:
            return uri
        video = found
    ev.video_id = video.id
    return video


def fetch_query_video(event_id: str, *, sessions: Sessions, settings: Settings) -> Outcome:
    """Fetches the video a parked event names by URI (downloads it, or reads a file in
    the media roots), hashes it, records it (query-only), then serves the event, which
    has it embedded: the decoding child probes it then, and what it refuses answers the
    event with the reason. A download takes up to ``download_deadline_s``, so it runs
    with no transaction open; a source that cannot be fetched answers the event with the
    reason."""
    with sessions() as session:
        outcome = serve_event(event_id, session=session, settings=settings)  # still to fetch?
    if outcome.fetch_uri is None:
        return outcome
    uri = outcome.fetch_uri
    try:
        fetched, error = library.fetch(uri, settings=settings, restrict=True, probe=False), None
    except library.SourceError as exc:
        fetched, error = None, str(exc)
    with sessions() as session:
        ev = queries.get_event(event_id, session=session)
        if fetched is None:
            return _answer(ev, error=error, session=session)
        ev.video_id = library.record(session, uri, fetched, in_library=False).video_id
        return serve_event(event_id, session=session, settings=settings)


def _answer(
    ev: Event,
    *,
    query: Video | None = None,
    model: ModelVersion | None = None,
    index_version: int | None = None,
    results: list[dict[str, Any]] | None = None,
    error: str | None = None,
    search_ms: float | None = None,
    session: Session,
    fresh: bool = False,
) -> Outcome:
    """Stores the one recommendation of an event and its outbox delivery (``fresh``: the
    event was recorded by this transaction, see :func:`_serve`)."""
    rec = Recommendation(
        event_id=ev.event_id,
        query_video_id=query.id if query else None,
        model_version_id=model.id if model else None,
        index_version_id=index_version,
        results={"items": results or []},
        error=error,
        search_ms=search_ms,
    )
    # Written with the recommendation, in one flush; should another worker have answered
    # the event first, the savepoint that loses the race takes this back too.
    ev.status, ev.error, ev.completed_at = ("failed" if error else "served"), error, utcnow()
    stored = queries.add_recommendation(rec, session=session, contended=not fresh)
    if stored is not rec:
        # Served concurrently by another worker (a redelivered message): keep theirs.
        return _existing_outcome(stored, session=session)
    EVENTS.labels(ev.status).inc()
    if error:
        logger.warning("event %s failed: %s", ev.event_id, error)
    body = callback_body(ev, rec, query=query, model=model)
    if not ev.callback_url:
        return Outcome(ev.event_id)
    # (settings read here: the error paths that answer an event are not handed them)
    lease_s = outbox.lease_s(get_settings())
    leased = outbox.create_delivery(rec, session=session, url=ev.callback_url, body=body, lease_s=lease_s)
    return Outcome(ev.event_id, delivery_id=leased.id, leased=leased)


def callback_body(ev: Event, rec: Recommendation, *, query: Video | None, model: ModelVersion | None) -> dict[str, Any]:
    """The callback contract (README, "Callback contract")."""
    return _body(ev.event_id, query=(query.id, query.uri) if query else None, model=model,
                 index_version=rec.index_version_id, results=rec.results.get("items", []), error=rec.error)  # fmt: skip


def _body(
    event_id: str,
    *,
    query: tuple[int, str] | None,
    model: ModelVersion | None,
    index_version: int | None,
    results: list[dict[str, Any]],
    error: str | None,
) -> dict[str, Any]:
    return {
        "type": "video.recommendations",
        "event_id": event_id,
        "query": {"video_id": query[0], "uri": query[1]} if query else None,
        "results": results,
        "model_version": model.name if model else None,
        "model_trained": model.trained if model else None,
        "index_version": index_version,
        "error": error,
    }


def _existing_outcome(rec: Recommendation, *, session: Session) -> Outcome:
    delivery = queries.find_delivery(rec.id, session=session)
    pending = delivery is not None and delivery.status == "pending"
    return Outcome(rec.event_id, delivery_id=delivery.id if pending and delivery else None)


def _reject(raw: Any, reason: str, *, fallback_id: str, session: Session) -> Outcome:
    """Records (once) and answers with ``reason`` an event that cannot be served as sent."""
    fields = raw if isinstance(raw, dict) else {}
    event_id = fields.get("event_id")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= 200:
        event_id = fallback_id
    callback_url = fields.get("callback_url")
    callback_url = callback_url if isinstance(callback_url, str) and len(callback_url) <= 2048 else ""
    ev = queries.find_event(event_id, session=session)
    if ev is None:
        ev = queries.record_rejected_event(event_id, raw=raw, callback_url=callback_url, reason=reason, session=session)
    elif queries.find_recommendation(event_id, session=session) is not None:
        return Outcome(event_id)
    logger.warning("rejected event %s: %s", event_id, reason)
    return _answer(ev, error=reason, session=session)


@dataclass(frozen=True)
class Embedded:
    video_id: int
    ok: bool
    frames: int = 0
    error: str | None = None
    seconds: float = 0.0  # decoding and the forward passes, overlapped


def embed_video(video_id: int, *, sessions: Sessions, settings: Settings, model_id: int | None = None) -> Embedded:
    """Decodes (in a sandboxed child), embeds (chunk by chunk, as the frames come) and
    stores one video for the active model
    (or ``model_id``, a model warming up). Skips work already done; records a readable
    error on the video when it is unusable.

    Decoding and the forward pass take seconds to minutes, so they run between two short
    units of work of ``sessions``, never inside one: no connection sits idle in a
    transaction (holding its snapshot and locks) while a worker computes."""
    with sessions() as session:
        job = _embedding_job(video_id, session=session, model_id=model_id)
    if isinstance(job, Embedded):
        return job
    started = time.perf_counter()
    try:  # opening the stream refuses what is no local video, with the same reasons
        stream = video_io.stream_frames(
            job.source,
            fps=settings.frame_fps,
            size=int(job.model.config.get("frame_size", 224)),
            max_frames=settings.max_frames,
            limits=video_io.decode_limits(settings),
            decode_threads=1,  # the child's one core; the forward passes take the others
        )
        # The backbone runs on each chunk of frames while the child decodes the next.
        with stream:
            vectors, frames = describe_stream(job.model, stream)  # (D,), (T, F)
            sample = stream.sample()
    except video_io.VideoError as exc:
        logger.warning("video %d failed to decode: %s", video_id, exc.reason)
        with sessions() as session:
            if (video := queries.find_video(video_id, session=session)) is not None:
                video.status, video.error = "failed", exc.reason
        return Embedded(video_id, ok=False, error=exc.reason)
    done = time.perf_counter()
    with sessions() as session:
        if not _store_embedding(video_id, job.model.id, vectors, frames, sample, session=session):
            return Embedded(video_id, ok=False, error=f"unknown video id {video_id}")
    logger.info("embedded video %d: %d frames, decode and embed %.2fs", video_id, len(sample.frames), done - started)
    return Embedded(video_id, True, len(sample.frames), None, done - started)


@dataclass(frozen=True)
class _EmbeddingJob:
    source: str  # the file (or URI) to decode
    model: ModelVersion  # loaded, detached: read outside the session


def _embedding_job(video_id: int, *, session: Session, model_id: int | None) -> _EmbeddingJob | Embedded:
    """What embedding ``video_id`` needs, or its result when there is nothing to do."""
    video = queries.find_video(video_id, session=session)
    if video is None:
        return Embedded(video_id, ok=False, error=f"unknown video id {video_id}")
    model = queries.model_to_embed_with(model_id, session=session)
    if queries.has_embedding(video_id, model.id, session=session):
        return Embedded(video_id, ok=True)
    refused = embedding_jobs.refusal(video_id, model, session=session)
    if refused is not None:  # a message sent before it was given up
        return Embedded(video_id, ok=False, error=refused)
    if video.status == "failed":
        return Embedded(video_id, ok=False, error=video.error)
    return _EmbeddingJob(source=video.local_path or video.uri, model=model)


def _store_embedding(
    video_id: int, model_id: int, vector: np.ndarray, frames: np.ndarray, sample: video_io.Sample, *, session: Session
) -> bool:
    """Stores the (D,) embedding, the (T, F) frame descriptors and what decoding learnt of
    the video; False when the video was deleted meanwhile."""
    video = queries.find_video(video_id, session=session)
    if video is None:
        return False
    queries.add_embedding(video_id, model_id, vector, frames=len(sample.frames), session=session,
                          frame_vectors=frames, frame_times=sample.timestamps)  # fmt: skip
    info = sample.info
    video.status, video.error = "ready", None
    video.duration_s, video.width, video.height = info.duration_s, info.width, info.height
    return True


def videos_to_embed(*, session: Session, limit: int | None = None, model_id: int | None = None) -> list[int]:
    """Library videos without an embedding for the active model, or ``model_id`` (the backfill)."""
    model = queries.model_to_embed_with(model_id, session=session)
    return queries.videos_without_embedding(model.id, limit=limit, session=session)


def fail_event(event_id: str, reason: str, *, session: Session, raw: Any = None) -> Outcome:
    """Answers an event with an error when serving it failed for good (an internal error
    after retries, or a worker process that kept dying), so nothing accepted goes
    unanswered."""
    ev = queries.find_event(event_id, session=session)
    if ev is None:  # failed before it was recorded: record it from the message
        raw = raw if raw is not None else {"event_id": event_id}
        return _reject(raw, reason, fallback_id=event_id, session=session)
    existing = queries.find_recommendation(event_id, session=session)
    if existing is not None:
        return _existing_outcome(existing, session=session)
    query = queries.find_video(ev.video_id, session=session) if ev.video_id else None
    return _answer(ev, query=query, error=reason, session=session)


def fail_video(video_id: int, reason: str, *, session: Session) -> None:
    """Marks a video unusable with a reason an operator can read."""
    video = queries.find_video(video_id, session=session)
    if video is not None and video.status != "ready":
        video.status, video.error = "failed", reason


def embedding_failed(
    video_id: int,
    reason: str,
    *,
    session: Session,
    settings: Settings,
    model_id: int | None = None,
    final: bool = False,
) -> None:
    """An embedding task failed for good (after its retries, at its hard time limit, or
    ``final``: its process kept dying). Counts a failed attempt of the video with the
    model (the active one when ``model_id`` is None), given up after
    ``embed_max_attempts`` (at once when ``final``), and marks a video that is not ready
    unusable, as :func:`fail_video`."""
    if queries.find_video(video_id, session=session) is None:
        return  # deleted meanwhile: nothing to count
    model = queries.model_to_embed_with(model_id, session=session)
    embedding_jobs.record_failure(
        video_id, model.id, reason, session=session, max_attempts=settings.embed_max_attempts, give_up=final
    )
    fail_video(video_id, reason, session=session)
