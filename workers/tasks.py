"""Thin task adapters: each takes ids (or the event's JSON), calls one function of app/,
and enqueues what that function says comes next, after the transaction commits.

Every task retries a failure a few times with backoff (a database restart, a race);
when a task fails for good, or its process keeps dying, the event or video it was for
is recorded as failed with the reason, and the event is still answered."""

from __future__ import annotations

import json
import logging
import random
from datetime import datetime
from typing import Any

import psycopg
from celery import Task
from celery.signals import worker_init, worker_process_init
from sqlalchemy.exc import InterfaceError, OperationalError

from app.config import get_settings
from app.db import autocommit, session_scope
from app.deliver import outbox
from app.index import rebuild
from app.learn import registry, rollout
from app.learn.registry import active_model
from app.logs import log_context
from app.serve import parked, recommend
from app.task_attempts import count_start
from workers.app import TIME_LIMITS, celery_app
from workers.metrics import queue_depths

logger = logging.getLogger(__name__)

# Postgres unreachable (a restart, a failover) is nobody's fault but the outage's: a
# task that meets it is retried with capped backoff until the database is back (about
# 45 minutes at most), not failed after the few quick retries below, meant for other
# errors. With those alone, a 5-second Postgres restart failed the events in flight, and
# their failure handlers, needing the database too, could not record or answer them:
# they were lost (tests/test_faults.py::test_redis_and_postgres_restarted_mid_stream).
# psycopg's own errors are here too: the warm path's statements are sent on the driver's
# connection as they are (app/serve/queries.py, app/task_attempts.py, record_delivered),
# so a connection that breaks under one raises psycopg's error, not SQLAlchemy's wrapper.
DATABASE_DOWN = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)
DATABASE_DOWN_MAX_RETRIES = 100
DATABASE_DOWN_BACKOFF_MAX_S = 30.0

RETRY_POLICY: dict[str, Any] = {
    "autoretry_for": (Exception,),
    "dont_autoretry_for": DATABASE_DOWN,  # RetriedTask retries these for longer
    "max_retries": 3,
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
}


class RetriedTask(Task):
    """Base of the tasks with RETRY_POLICY: also retries while Postgres is unreachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except DATABASE_DOWN as exc:
            retries = self.request.retries or 0
            countdown = min(DATABASE_DOWN_BACKOFF_MAX_S, 2.0**retries) * random.uniform(0.5, 1.0)
            logger.warning("%s: database unavailable (%s); retry %d in %.1f s", self.name, type(exc).__name__,
                           retries + 1, countdown)  # fmt: skip
            raise self.retry(exc=exc, countdown=countdown, max_retries=DATABASE_DOWN_MAX_RETRIES) from None


@worker_init.connect
def _init_worker(**_: Any) -> None:
    # Here for the solo and thread pools, which serve in this process; a prefork child
    # sets it again after the fork.
    _limit_blas_threads()


@worker_process_init.connect
def _init_worker_process(**_: Any) -> None:
    _limit_blas_threads()
    # Torch and CUDA are initialised here, in the child, never before a fork.
    import torch

    threads = get_settings().torch_threads
    if threads:
        torch.set_num_threads(threads)


def _limit_blas_threads() -> None:
    threads = get_settings().blas_threads
    if threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")


def _process_died_too_often(task: Task, *, write_first_start: bool = True) -> bool:
    """Counts, in the database, how often this message started. A message whose process
    keeps dying (and so is redelivered) is given up after a bounded number (celery#9082).
    Retries of the task itself carry the same id and count too.

    With ``write_first_start=False`` (the event tasks: it is a statement and a round trip
    of every warm event) a message's first start is not written: nothing can have died
    on it yet. Every message put back in its queue is marked redelivered (by kombu, and by
    :class:`workers.app._SafeRedisChannel` where kombu could not), so every later start is
    written, and its row counts the unwritten first start too."""
    retries = task.request.retries or 0
    unwritten = 0
    if not write_first_start:
        if not retries and not (task.request.delivery_info or {}).get("redelivered") and _broker_marks_redeliveries():
            return False
        unwritten = 1
    task_id = task.request.id or "unknown"
    with autocommit() as conn:  # committed before the task's work, which may kill the process
        attempts = count_start(conn, task_id=task_id, name=task.name, unwritten=unwritten)
    # Each retry is a new message under the same id, started once if nothing goes wrong:
    # what is left after those is redeliveries of messages whose process died. The limit
    # is task_max_attempts starts of the current message, as the README documents (it was
    # task_max_attempts + max_retries, so a crash loop ran 3 more times than configured).
    limit = get_settings().task_max_attempts + retries
    if attempts > limit:
        logger.error("task %s %s started %d times; giving up", task.name, task_id, attempts)
        return True
    return False


def _broker_marks_redeliveries() -> bool:
    """Whether a message put back in its queue arrives marked redelivered: on Redis, yes;
    the embedded broker (kombu's filesystem transport) marks it where Celery does not look."""
    return not get_settings().embedded


def _after(outcome: recommend.Outcome, *, deliver_here: bool = False) -> None:
    """Enqueues what ``outcome`` says comes next. A new delivery, leased to this task, is
    attempted right here with ``deliver_here`` (the event tasks: one task hop less per
    event), else handed to a `callbacks` task with its lease (a maintenance task never
    waits on a chat app)."""
    if outcome.fetch_uri is not None:
        fetch_video.delay(event_id=outcome.event_id)
    if outcome.embed_video_id is not None:
        embed_video.delay(outcome.embed_video_id, event_id=outcome.event_id)
    leased = outcome.leased
    if leased is not None and deliver_here:
        with log_context(delivery_id=leased.id):
            outbox.attempt_leased(leased, sessions=session_scope, settings=get_settings())
    elif outcome.delivery_id is not None:
        lease = leased.lease_until.isoformat() if leased is not None else None
        deliver_callback.delay(outcome.delivery_id, lease=lease)


def _fail_event(event_id: str | None, reason: str, raw: Any = None) -> None:
    if not event_id:
        return
    with session_scope() as session:
        outcome = recommend.fail_event(event_id, reason, session=session, raw=raw)
    _after(outcome)


class EventTask(RetriedTask):
    """Answers the event with an error once the task has failed for good."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        event = kwargs.get("event") if isinstance(kwargs.get("event"), dict) else {}
        event_id = kwargs.get("event_id") or event.get("event_id")
        _fail_event(event_id, f"internal error: {type(exc).__name__}: {exc}"[:500], raw=event or None)


@celery_app.task(
    name="vidsim.video_selected", base=EventTask, bind=True, time_limit=TIME_LIMITS["events"], **RETRY_POLICY
)
def video_selected(self: Task, event: Any = None, **extra: Any) -> None:
    """The public entry point: the chat app publishes ``event`` (see README)."""
    if event is None and extra:
        event = extra  # a producer that sent the event's fields as keyword arguments
    if _process_died_too_often(self, write_first_start=False):
        # The event with it: where it killed the process before it was recorded, the
        # callback URL is only in the message.
        raw = event if isinstance(event, dict) else None
        _fail_event(raw.get("event_id") if raw else None, "the worker process kept dying", raw=raw)
        return
    with session_scope() as session:
        outcome = recommend.accept_event(
            event, session=session, settings=get_settings(), fallback_id=f"invalid-{self.request.id}"
        )
    _after(outcome, deliver_here=True)


@celery_app.task(name="vidsim.serve_event", base=EventTask, bind=True, time_limit=TIME_LIMITS["events"], **RETRY_POLICY)
def serve_event(self: Task, event_id: str) -> None:
    if _process_died_too_often(self, write_first_start=False):
        _fail_event(event_id, "the worker process kept dying while serving this event")
        return
    with session_scope() as session:
        outcome = recommend.serve_event(event_id, session=session, settings=get_settings())
    _after(outcome, deliver_here=True)


@celery_app.task(name="vidsim.fetch_video", base=EventTask, bind=True, time_limit=TIME_LIMITS["fetch"], **RETRY_POLICY)
def fetch_video(self: Task, event_id: str) -> None:
    """Fetches and hashes the video a parked event names by URI, on the `fetch` queue (a
    pool of threads: a slow server holds one thread, never a process that serves
    events), then serves the event or has its video embedded (the decoding child probes
    it)."""
    if _process_died_too_often(self):
        _fail_event(event_id, "the worker process kept dying while fetching this event's video")
        return
    _after(recommend.fetch_query_video(event_id, sessions=session_scope, settings=get_settings()), deliver_here=True)


class EmbedTask(RetriedTask):
    """Counts the failure against the video and model once the task has failed for good
    (given up after VIDSIM_EMBED_MAX_ATTEMPTS), then serves the waiting event again."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        video_id = kwargs.get("video_id", args[0] if args else None)
        if video_id is not None:
            reason = f"embedding failed: {type(exc).__name__}: {exc}"[:500]
            with session_scope() as session:
                recommend.embedding_failed(video_id, reason, session=session, settings=get_settings(),
                                           model_id=kwargs.get("model_id"))  # fmt: skip
        if kwargs.get("event_id"):
            serve_event.delay(event_id=kwargs["event_id"])  # answers, or asks for another attempt


@celery_app.task(name="vidsim.embed_video", base=EmbedTask, bind=True, time_limit=TIME_LIMITS["embed"], **RETRY_POLICY)
def embed_video(self: Task, video_id: int, event_id: str | None = None, model_id: int | None = None) -> None:
    """Embeds one video (for the active model, or a model warming up); an event waiting
    on it is served next (on the events queue)."""
    if _process_died_too_often(self):
        reason = "the worker process kept dying while embedding this video"
        with session_scope() as session:
            recommend.embedding_failed(video_id, reason, session=session, settings=get_settings(), model_id=model_id,
                                       final=True)  # fmt: skip
    else:
        recommend.embed_video(video_id, sessions=session_scope, settings=get_settings(), model_id=model_id)
    if event_id is not None:
        serve_event.delay(event_id=event_id)


@celery_app.task(name="vidsim.deliver_callback", base=RetriedTask, time_limit=TIME_LIMITS["callbacks"], **RETRY_POLICY)
def deliver_callback(delivery_id: int, lease: str | None = None) -> None:
    """One attempt; failures are rescheduled in the outbox, not by Celery countdowns.
    ``lease``: the token of the task that handed it over (``outbox.take_due``, or the
    lease a new delivery is created with)."""
    settings = get_settings()
    token = datetime.fromisoformat(lease) if lease else None
    with session_scope() as session:
        delivery = outbox.claim(delivery_id, session=session, lease_s=outbox.lease_s(settings), token=token)
    if delivery is None:
        return  # not due, done, or held by another worker
    with log_context(event_id=json.loads(delivery.body).get("event_id"), delivery_id=delivery_id):
        result = outbox.attempt(delivery, settings=settings)
        with session_scope() as session:
            outbox.record(delivery_id, result, session=session, settings=settings)


@celery_app.task(name="vidsim.sweep_outbox", time_limit=TIME_LIMITS["maintenance"])
def sweep_outbox() -> int:
    """Beat: enqueue every delivery whose next attempt is due (or whose lease lapsed)."""
    with session_scope() as session:
        taken = outbox.take_due(session=session, lease_s=outbox.lease_s(get_settings()))
    for delivery_id, lease in taken:
        deliver_callback.delay(delivery_id, lease=lease.isoformat())
    return len(taken)


@celery_app.task(name="vidsim.backfill", time_limit=TIME_LIMITS["maintenance"])
def backfill(limit: int | None = None, model_id: int | None = None) -> int:
    with session_scope() as session:
        ids = recommend.videos_to_embed(session=session, limit=limit, model_id=model_id)
    for video_id in ids:
        embed_video.delay(video_id, model_id=model_id)
    return len(ids)


@celery_app.task(name="vidsim.activate_model", time_limit=TIME_LIMITS["maintenance"])
def activate_model(model_id: int) -> int:
    """Starts a model's rollout: embed the library with it; `advance_rollouts` switches
    serving to it once its index is built. The old model and index serve meanwhile.
    Returns how many embeddings were asked for."""
    with session_scope() as session:
        rollout.start_rollout(session=session, model_id=model_id)
    return len(_advance(model_id, resend_stale=False).enqueue)


@celery_app.task(name="vidsim.advance_rollouts", time_limit=TIME_LIMITS["maintenance"])
def advance_rollouts() -> list[int]:
    """Beat: each warming model asks for the embeddings still missing, or, once its
    library is embedded, gets its index built, and serving switches to both in one
    transaction (one per model). Returns the models that switched."""
    with session_scope() as session:
        warming = [m.id for m in registry.warming_models(session=session)]
    resend_stale = bool(warming) and _embed_queue_empty()
    switched = [m for m in warming if _advance(m, resend_stale=resend_stale).index is not None]
    for model_id in switched:
        logger.info("model %d now serves", model_id)
    return switched


def _advance(model_id: int, *, resend_stale: bool) -> rollout.Step:
    with session_scope() as session:
        step = rollout.advance(session=session, model_id=model_id, settings=get_settings(), resend_stale=resend_stale)
    for video_id in step.enqueue:
        embed_video.delay(video_id, model_id=model_id)
    return step


@celery_app.task(name="vidsim.sweep_parked", time_limit=TIME_LIMITS["maintenance"])
def sweep_parked() -> int:
    """Beat: serves again the events parked too long for their video's embedding, and
    answers with an error those past VIDSIM_PARKED_EVENT_DEADLINE_S."""
    with session_scope() as session:
        swept = parked.sweep_parked(session=session, settings=get_settings(), redrive=_embed_queue_empty())
    for event_id in swept.redrive:
        serve_event.delay(event_id=event_id)
    for outcome in swept.answered:
        _after(outcome)
    return len(swept.redrive) + len(swept.answered)


def _embed_queue_empty() -> bool:
    """Nothing waits in the embed queue: an embedding asked for long ago and not made was
    lost (or is running). False when the broker cannot tell."""
    try:
        return queue_depths()["embed"] == 0
    except Exception as exc:
        logger.warning("embed queue depth unavailable (%s): nothing is asked for again", exc)
        return False


@celery_app.task(name="vidsim.rebuild_index", time_limit=TIME_LIMITS["maintenance"])
def rebuild_index() -> int:
    with session_scope() as session:
        version = rebuild.rebuild_index(session=session, model=active_model(session=session), settings=get_settings())
        return version.id


@celery_app.task(name="vidsim.refresh_index", time_limit=TIME_LIMITS["maintenance"])
def refresh_index() -> int | None:
    """Beat's periodic rebuild: folds the embeddings made since the last build into a
    new version when there are enough of them; skipped while another rebuild runs."""
    try:
        with session_scope() as session:
            version = rebuild.refresh_index(
                session=session, model=active_model(session=session), settings=get_settings()
            )
            return version.id if version is not None else None
    except rebuild.RebuildBusy:
        logger.info("index refresh skipped: another rebuild is running")
        return None
