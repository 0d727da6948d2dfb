"""ORM tables: Postgres (SQLite when embedded) is the system of record.

Alembic owns the schema (migrations/); these classes describe it for queries.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    FetchedValue,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# BIGINT on Postgres, but INTEGER on SQLite so that it is the auto-incrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: Json}


class Video(Base):
    """A video known to vidsim. Library videos are recommended; others (a URI seen only
    in an event) are queries only. ``id`` is the vector index key."""

    __tablename__ = "videos"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    uri: Mapped[str] = mapped_column(Text, unique=True)
    local_path: Mapped[str | None] = mapped_column(Text)
    content_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    in_library: Mapped[bool] = mapped_column(Boolean, default=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    status: Mapped[str] = mapped_column(String(16), default="registered")  # registered|ready|failed
    error: Mapped[str | None] = mapped_column(Text)
    duration_s: Mapped[float | None] = mapped_column(Float)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    collection: Mapped[str | None] = mapped_column(String(200), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ModelVersion(Base):
    """An encoder checkpoint. Exactly one is active (partial unique index)."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    checkpoint_path: Mapped[str | None] = mapped_column(Text)  # None: deterministic init
    dim: Mapped[int] = mapped_column(Integer)
    trained: Mapped[bool] = mapped_column(Boolean, default=False)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    data_summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # candidate -> warming (library being embedded, its index built) -> active -> retired.
    # The active one serves; a warming one takes over when its index is ready.
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    is_active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index(
            "one_active_model",
            "is_active",
            unique=True,
            postgresql_where=text("is_active"),
            sqlite_where=text("is_active"),
        ),
    )


class Embedding(Base):
    """One video's vector under one model version, float32 bytes. ``xact`` stamps when it
    was written, or its video last became an enabled library video (database triggers,
    migration 0004): on Postgres the writing transaction's id, so an index version knows
    which rows may have committed after its build read (``IndexVersion.horizon``)."""

    __tablename__ = "embeddings"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    dim: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer)
    # The frame descriptors from the same forward pass (migration 0007): float16
    # (frames, frame_dim) and each frame's time, float32 seconds; None on older rows.
    frame_dim: Mapped[int | None] = mapped_column(Integer)
    frame_vectors: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    frame_times: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    xact: Mapped[int | None] = mapped_column(BigInteger, server_default=FetchedValue())  # set by the database
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("video_id", "model_version_id"),
        Index("embeddings_fresh", "model_version_id", "xact"),
    )


class EmbeddingJob(Base):
    """One video's embedding by one model, while it is owed: when a rollout last asked a
    worker for it, and how many embedding tasks failed on it (``attempts``, the last
    reason in ``last_error``). After VIDSIM_EMBED_MAX_ATTEMPTS it is ``given_up``: a
    rollout skips the video, and events for it are answered with the reason instead of
    asking for the embedding again."""

    __tablename__ = "embedding_jobs"

    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id", ondelete="CASCADE"), primary_key=True, index=True)
    requested_at: Mapped[datetime | None] = mapped_column()
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    given_up: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class IndexVersion(Base):
    """A USearch file built from the embeddings of one model version."""

    __tablename__ = "index_versions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(8))
    # The newest embedding id when it was built (a figure: ids are not commit order).
    embedding_watermark: Mapped[int] = mapped_column(BigInteger)
    # Every embedding stamped below it (Embedding.xact) was committed before the build read:
    # those stamped at or above it may be missing from the file and are searched exactly.
    horizon: Mapped[int] = mapped_column(BigInteger)
    build_seconds: Mapped[float] = mapped_column(Float)
    # How the file was built and is searched (metric, quantisation, shards, calibration).
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    is_active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index(
            "one_active_index",
            "is_active",
            unique=True,
            postgresql_where=text("is_active"),
            sqlite_where=text("is_active"),
        ),
    )


class Event(Base):
    """A video-selected event, keyed by the client's event id (the idempotency key)."""

    __tablename__ = "events"

    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    payload: Mapped[dict[str, Any]] = mapped_column()
    # (every column that references a video is indexed: deleting a video checks them, 0008)
    video_id: Mapped[int | None] = mapped_column(ForeignKey("videos.id"), index=True)
    k: Mapped[int] = mapped_column(Integer)
    callback_url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="received")  # received|fetching|embedding|served|failed
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()


class Recommendation(Base):
    """The answer to one event: results (or an error), exactly one per event."""

    __tablename__ = "recommendations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("events.event_id"), unique=True)
    query_video_id: Mapped[int | None] = mapped_column(ForeignKey("videos.id"), index=True)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    index_version_id: Mapped[int | None] = mapped_column(ForeignKey("index_versions.id"))
    results: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"items": [...]}
    error: Mapped[str | None] = mapped_column(Text)
    search_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Delivery(Base):
    """The outbox: one signed callback per recommendation, retried on a schedule kept
    here (a beat sweeper enqueues due rows), not in Celery countdowns."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    recommendation_id: Mapped[int] = mapped_column(ForeignKey("recommendations.id"), unique=True)
    url: Mapped[str] = mapped_column(Text)
    webhook_id: Mapped[str] = mapped_column(String(200), unique=True)
    body: Mapped[str] = mapped_column(Text)  # frozen JSON: every attempt sends the same bytes
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|delivered|dead|disabled
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column()
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("deliveries_due", "status", "next_attempt_at"),)


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float)
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)


class TaskAttempt(Base):
    """The application's own count of how often a task message started. A task whose
    process keeps dying (and so is redelivered) is given up after a bounded number."""

    __tablename__ = "task_attempts"

    task_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_started_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingRun(Base):
    """A training job that outlives any one task (app.learn.runs): a chain of chunks, each
    a ``vidsim.train_chunk`` task that resumes the run from ``out_dir/last.pt``, trains
    within a time budget and enqueues the next. The run's config and videos are fixed
    when it starts, so every chunk trains the same run.

    queued -> running -> done (``model_version_id`` registered), or -> stopping (asked
    while a chunk runs) -> stopped, or -> failed (``error``). Stopped and failed runs
    start again where they stopped when started again under their name."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # the model version's name once done
    preset: Mapped[str | None] = mapped_column(String(64))  # what it was made from, for people
    config: Mapped[dict[str, Any]] = mapped_column()  # TrainConfig.to_dict()
    videos: Mapped[list[str]] = mapped_column(Json)
    out_dir: Mapped[str] = mapped_column(Text)
    init_model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))  # a fine-tune's parent
    init_checkpoint: Mapped[str | None] = mapped_column(Text)
    activate: Mapped[bool] = mapped_column(Boolean, default=False)  # roll the model out once done
    state: Mapped[str] = mapped_column(String(16), default="queued")
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)  # known once the first chunk starts
    chunks: Mapped[int] = mapped_column(Integer, default=0)  # chunks completed
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # starts of the current chunk
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    error: Mapped[str | None] = mapped_column(Text)
    # Last sign of life: a step, a chunk's start or end, an enqueue (the watchdog's clock).
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
