"""Thin task adapters: each takes ids (or the event's JSON), calls one function of app/,
and enqueues what that function says comes next, after the transaction commits."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import worker_process_init
from sqlalchemy.dialects import postgresql, sqlite

from app import delivery as outbox
from app import recommend, search
from app.config import get_settings
from app.db import session_scope
from app.models import TaskAttempt, utcnow
from app.registry import active_model
from workers.app import TIME_LIMITS, celery_app

logger = logging.getLogger(__name__)


@worker_process_init.connect
def _init_worker_process(**_: Any) -> None:
    # Torch and CUDA are initialised here, in the child, never before a fork.
    import torch

    threads = get_settings().torch_threads
    if threads:
        torch.set_num_threads(threads)


def _count_attempt(task: Task) -> int:
    """How many times this message has started, counted in the database so that a task
    whose process keeps dying is redelivered a bounded number of times (celery#9082)."""
    task_id = task.request.id or "unknown"
    with session_scope() as session:
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = insert(TaskAttempt).values(task_id=task_id, name=task.name, attempts=1, last_started_at=utcnow())
        stmt = stmt.on_conflict_do_update(
            index_elements=["task_id"],
            set_={"attempts": TaskAttempt.attempts + 1, "last_started_at": utcnow()},
        )
        session.execute(stmt)
        return int(session.get_one(TaskAttempt, task_id, populate_existing=True).attempts)


def _over_attempts(task: Task) -> bool:
    attempts = _count_attempt(task)
    limit = get_settings().task_max_attempts
    if attempts > limit:
        logger.error("task %s %s started %d times; giving up", task.name, task.request.id, attempts)
        return True
    return False


def _after(outcome: recommend.Outcome) -> None:
    if outcome.embed_video_id is not None:
        embed_video.delay(outcome.embed_video_id, event_id=outcome.event_id)
    if outcome.delivery_id is not None:
        deliver_callback.delay(outcome.delivery_id)


@celery_app.task(name="vidsim.video_selected", bind=True, time_limit=TIME_LIMITS["events"])
def video_selected(self: Task, event: Any = None, **extra: Any) -> None:
    """The public entry point: the chat app publishes ``event`` (see README)."""
    if event is None and extra:
        event = extra  # a producer that sent the event's fields as keyword arguments
    if _over_attempts(self):
        return
    with session_scope() as session:
        outcome = recommend.accept_event(
            session, event, settings=get_settings(), fallback_id=f"invalid-{self.request.id}"
        )
    _after(outcome)


@celery_app.task(name="vidsim.serve_event", bind=True, time_limit=TIME_LIMITS["events"])
def serve_event(self: Task, event_id: str) -> None:
    if _over_attempts(self):
        return
    with session_scope() as session:
        outcome = recommend.serve_event(session, event_id, settings=get_settings())
    _after(outcome)


@celery_app.task(name="vidsim.embed_video", bind=True, time_limit=TIME_LIMITS["embed"])
def embed_video(self: Task, video_id: int, event_id: str | None = None) -> None:
    """Embeds one video; an event waiting on it is served next (on the events queue)."""
    if not _over_attempts(self):
        with session_scope() as session:
            recommend.embed_video(session, video_id, settings=get_settings())
    if event_id is not None:
        serve_event.delay(event_id)


@celery_app.task(name="vidsim.deliver_callback", time_limit=TIME_LIMITS["callbacks"])
def deliver_callback(delivery_id: int) -> None:
    settings = get_settings()
    with session_scope() as session:
        delivery = outbox.claim(session, delivery_id, lease_s=settings.callback_timeout_s * 2 + 30)
    if delivery is None:
        return  # not due, done, or held by another worker
    result = outbox.attempt(delivery, settings=settings)
    with session_scope() as session:
        outbox.record(session, delivery_id, result, settings=settings)


@celery_app.task(name="vidsim.sweep_outbox", time_limit=TIME_LIMITS["maintenance"])
def sweep_outbox() -> int:
    """Beat: enqueue every delivery whose next attempt is due."""
    with session_scope() as session:
        ids = outbox.due(session)
    for delivery_id in ids:
        deliver_callback.delay(delivery_id)
    return len(ids)


@celery_app.task(name="vidsim.backfill", time_limit=TIME_LIMITS["maintenance"])
def backfill(limit: int | None = None) -> int:
    with session_scope() as session:
        ids = recommend.videos_to_embed(session, limit=limit)
    for video_id in ids:
        embed_video.delay(video_id)
    return len(ids)


@celery_app.task(name="vidsim.rebuild_index", time_limit=TIME_LIMITS["maintenance"])
def rebuild_index() -> int:
    settings = get_settings()
    with session_scope() as session:
        version = search.rebuild_index(session, active_model(session), settings=settings)
        return version.id
