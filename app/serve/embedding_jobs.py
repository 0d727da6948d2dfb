"""The embeddings still owed, per (model, video): when a rollout last asked a worker for
one, and how often embedding tasks failed on it.

Two loops are bounded here. A rollout asks again for what is still missing (a video
added while the model warmed up, a message lost) instead of waiting for ever on the list
it took at activation; and an embedding that keeps failing (the model cannot embed that
video: not a VideoError, which fails the video itself) is given up after
``embed_max_attempts`` failed tasks, so that neither a rollout nor an event waits on it,
and serving does not ask for it again and again.

Functions take ``session`` keyword-only, may flush, and never commit."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, delete, func, select
from sqlalchemy.orm import Session

from app.db import dialect_insert
from app.models import EmbeddingJob, ModelVersion, Video, utcnow

logger = logging.getLogger(__name__)


def given_up(video_id: int, model_id: int, *, session: Session) -> EmbeddingJob | None:
    """The record of a video that the model failed to embed for good, if it did."""
    job = session.get(EmbeddingJob, (model_id, video_id))
    return job if job is not None and job.given_up else None


def refusal(video_id: int, model: ModelVersion, *, session: Session) -> str | None:
    """Why the video will not be embedded with ``model`` (given up), or None."""
    job = given_up(video_id, model.id, session=session)
    if job is None:
        return None
    return f"video {video_id} could not be embedded with model {model.name} ({job.attempts} attempts): {job.last_error}"


def record_failure(
    video_id: int, model_id: int, reason: str, *, session: Session, max_attempts: int, give_up: bool = False
) -> EmbeddingJob:
    """Counts one failed embedding task of the video with the model; gives it up at
    ``max_attempts`` (or at once with ``give_up``). A rollout asks for it again (its
    request is over) until then."""
    values = {"requested_at": None, "last_error": reason, "updated_at": utcnow()}
    stmt = dialect_insert(session)(EmbeddingJob).values(
        model_version_id=model_id, video_id=video_id, attempts=1, given_up=give_up or max_attempts <= 1, **values
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["model_version_id", "video_id"],
        set_={
            "attempts": EmbeddingJob.attempts + 1,
            "given_up": True if give_up else EmbeddingJob.given_up | (EmbeddingJob.attempts + 1 >= max_attempts),
            **values,
        },
    )
    session.execute(stmt)
    job = session.get_one(EmbeddingJob, (model_id, video_id), populate_existing=True)
    if job.given_up:
        logger.error("video %d given up for model %d after %d failed attempts: %s", video_id, model_id,
                     job.attempts, reason)  # fmt: skip
    else:
        logger.warning("embedding video %d with model %d failed (attempt %d of %d): %s", video_id, model_id,
                       job.attempts, max_attempts, reason)  # fmt: skip
    return job


def to_request(model_id: int, missing: list[int], *, session: Session, stale_before: datetime | None) -> list[int]:
    """Of the videos ``missing`` an embedding by the model, those to ask a worker for:
    never asked for (added since, or failed and still to retry), or, with
    ``stale_before``, asked for before then (the message was lost)."""
    rows = session.execute(
        select(EmbeddingJob.video_id, EmbeddingJob.requested_at).where(
            EmbeddingJob.model_version_id == model_id, EmbeddingJob.requested_at.is_not(None)
        )
    )
    requested = {video_id: at for video_id, at in rows if at is not None}
    return [v for v in missing if v not in requested or (stale_before is not None and requested[v] < stale_before)]


def mark_requested(video_ids: list[int], model_id: int, *, session: Session) -> None:
    """Records that workers were just asked for these videos' embeddings by the model."""
    now = utcnow()
    for start in range(0, len(video_ids), 1000):
        chunk = video_ids[start : start + 1000]
        stmt = dialect_insert(session)(EmbeddingJob).values(
            [
                {"model_version_id": model_id, "video_id": v, "requested_at": now, "attempts": 0,
                 "given_up": False, "updated_at": now}
                for v in chunk
            ]
        )  # fmt: skip
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["model_version_id", "video_id"], set_={"requested_at": now, "updated_at": now}
            )
        )


def forget(model_id: int, *, session: Session) -> None:
    """Drops the model's records: a new rollout gives every video its attempts again."""
    session.execute(delete(EmbeddingJob).where(EmbeddingJob.model_version_id == model_id))


@dataclass(frozen=True)
class GivenUp:
    count: int  # library videos given up for the model
    last_error: str | None  # the latest reason


def given_up_in_library(model_id: int, *, session: Session) -> GivenUp:
    """The enabled library videos that the model failed to embed for good."""
    where = (
        EmbeddingJob.model_version_id == model_id,
        EmbeddingJob.given_up,
        Video.in_library,
        Video.enabled,
        Video.status != "failed",
    )
    count = session.scalar(select(func.count()).select_from(EmbeddingJob).join(Video).where(*where)) or 0
    last = session.scalar(
        select(EmbeddingJob.last_error).join(Video).where(*where).order_by(EmbeddingJob.updated_at.desc()).limit(1)
    )
    return GivenUp(count, last)


def given_up_ids(model_id: int) -> Select[int]:
    """A subquery of the videos given up for the model (to leave out of a backfill)."""
    return select(EmbeddingJob.video_id).where(EmbeddingJob.model_version_id == model_id, EmbeddingJob.given_up)
