"""What an operator asks first: which model and index serve, what is pending, what failed."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import ColumnExpressionArgument, func, select
from sqlalchemy.orm import Session

from app.index.queries import embeddings_since_index
from app.models import Delivery, Embedding, Event, IndexVersion, ModelVersion, TrainingRun, Video, utcnow

# Training runs still going, and those that ended within this long, are shown.
RECENT_TRAINING = timedelta(hours=24)

if TYPE_CHECKING:
    from app.learn.rollout import Progress


@dataclass
class Failure:
    at: datetime
    what: str
    reason: str


@dataclass
class TrainingProgress:
    """A training run (app.learn.runs) as `vidsim status` shows it."""

    name: str
    state: str  # queued | running | stopping | stopped | done | failed
    step: int
    total_steps: int | None  # None until its first chunk starts
    chunks: int  # chunks completed
    model_id: int | None  # the model version it registered


@dataclass
class Overview:
    model: str | None
    model_trained: bool
    warming: list[Progress]  # the rollouts in progress
    embedded: int  # library videos (enabled) the active model embedded
    library: int  # library videos (enabled)
    query_only: int  # query-only videos (cold events') the active model embedded besides
    index: str | None
    index_lag: int  # embeddings newer than the index (searched exactly)
    events_last_hour: dict[str, int]
    deliveries: dict[str, int]
    parked: int = 0  # events waiting for their video's embedding
    oldest_parked_s: float | None = None
    failures: list[Failure] = field(default_factory=list)
    training: list[TrainingProgress] = field(default_factory=list)


@dataclass
class IndexStatus:
    model: ModelVersion
    embedded: int  # the model's embeddings
    index: IndexVersion | None  # the active index version; None: searches are exact
    newer: int  # embeddings newer than that build (searched exactly beside it)


def _embedding_count(session: Session, model: ModelVersion) -> int:
    return session.scalar(select(func.count()).where(Embedding.model_version_id == model.id)) or 0


def _embedded_videos(session: Session, model: ModelVersion, *where: ColumnExpressionArgument[bool]) -> int:
    """The model's embeddings of the videos ``where`` selects."""
    joined = select(func.count()).select_from(Embedding).join(Video, Video.id == Embedding.video_id)
    return session.scalar(joined.where(Embedding.model_version_id == model.id, *where)) or 0


def overview(*, session: Session, failures: int = 10) -> Overview:
    """`vidsim status`: the serving model and index, the last hour's events, deliveries by
    state and the ``failures`` most recent failures of events, videos and deliveries."""
    # here: they load torch, which `vidsim status` does without
    from app.learn.registry import warming_models
    from app.learn.rollout import progress
    from app.serve.parked import PARKED_STATUSES

    model = session.scalar(select(ModelVersion).where(ModelVersion.is_active))
    warming = [progress(session=session, model_id=m.id) for m in warming_models(session=session)]
    library = session.scalar(select(func.count()).where(Video.in_library, Video.enabled)) or 0
    embedded = query_only = 0
    index_text, lag = None, 0
    if model is not None:
        embedded = _embedded_videos(session, model, Video.in_library, Video.enabled)
        query_only = _embedded_videos(session, model, ~Video.in_library)
        idx, lag = embeddings_since_index(session=session, model=model)
        if idx is not None:
            index_text = f"{idx.id}: {idx.size} vectors, {idx.dim}-d {idx.dtype}, built {idx.created_at:%Y-%m-%d %H:%M}"
    since = utcnow() - timedelta(hours=1)
    events = dict(
        session.execute(
            select(Event.status, func.count()).where(Event.received_at >= since).group_by(Event.status)
        ).all()
    )
    deliveries = dict(session.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())
    parked, oldest = session.execute(
        select(func.count(), func.min(Event.received_at)).where(Event.status.in_(PARKED_STATUSES))
    ).one()
    recent: list[Failure] = []
    for ev in session.scalars(
        select(Event).where(Event.status == "failed").order_by(Event.received_at.desc()).limit(failures)
    ):
        recent.append(Failure(ev.received_at, f"event {ev.event_id}", ev.error or ""))
    for v in session.scalars(
        select(Video).where(Video.status == "failed").order_by(Video.updated_at.desc()).limit(failures)
    ):
        recent.append(Failure(v.updated_at, f"video {v.id}", v.error or ""))
    for d in session.scalars(
        select(Delivery).where(Delivery.status.in_(("dead", "disabled"))).order_by(Delivery.id.desc()).limit(failures)
    ):
        recent.append(Failure(d.created_at, f"delivery {d.id} ({d.status})", d.last_error or ""))
    failed_runs = select(TrainingRun).where(TrainingRun.state == "failed")
    for run in session.scalars(failed_runs.order_by(TrainingRun.finished_at.desc()).limit(failures)):
        recent.append(Failure(run.finished_at or run.created_at, f"training run {run.name}", run.error or ""))
    recent.sort(key=lambda f: f.at, reverse=True)
    return Overview(
        model=f"{model.id} {model.name}" if model else None,
        model_trained=bool(model and model.trained),
        warming=warming,
        embedded=embedded,
        library=library,
        query_only=query_only,
        index=index_text,
        index_lag=lag,
        events_last_hour=events,
        deliveries=deliveries,
        parked=parked,
        oldest_parked_s=(utcnow() - oldest).total_seconds() if oldest is not None else None,
        failures=recent[:failures],
        training=training_progress(session=session),
    )


def training_progress(*, session: Session) -> list[TrainingProgress]:
    """Training runs still going, and those that ended in the last RECENT_TRAINING, oldest first."""
    since = utcnow() - RECENT_TRAINING
    stmt = select(TrainingRun).where(TrainingRun.finished_at.is_(None) | (TrainingRun.finished_at >= since))
    return [
        TrainingProgress(run.name, run.state, run.step, run.total_steps, run.chunks, run.model_version_id)
        for run in session.scalars(stmt.order_by(TrainingRun.id))
    ]


def index_status(*, session: Session) -> IndexStatus:
    """`vidsim index status`: the active model (on a fresh install, the untrained initial
    one is made active), its embedding count and the active index version."""
    from app.learn.registry import active_model

    model = active_model(session=session)
    index = session.scalar(select(IndexVersion).where(IndexVersion.is_active))
    _, newer = embeddings_since_index(session=session, model=model)
    return IndexStatus(model=model, embedded=_embedding_count(session, model), index=index, newer=newer)
