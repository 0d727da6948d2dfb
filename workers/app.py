"""The Celery application: JSON messages over Redis (or a filesystem broker when
embedded), late acknowledgement, one message prefetched at a time, and a hard time limit
under the broker's visibility timeout on every task."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from functools import partial
from queue import Empty
from typing import Any

from celery import Celery
from celery.apps import worker as celery_worker
from celery.signals import celeryd_after_setup, celeryd_init, setup_logging, task_postrun, task_prerun
from kombu import Exchange, Queue
from kombu.transport import redis as kombu_redis

from app.config import get_settings
from app.logs import configure_logging, formatter, set_log_context

logger = logging.getLogger(__name__)

QUEUES = ("events", "fetch", "embed", "callbacks", "maintenance", "crawl", "train")

# Hard limits (seconds) per queue; all must stay below the visibility timeout, or a
# long task would be redelivered and run twice in parallel (celery#5935). `fetch` runs
# in a thread pool, where Celery enforces none: there a fetch is bounded by its own
# deadlines (download_deadline_s, then decode_timeout_s for the probe). Training runs
# longer than any of them as a chain of chunks (app.learn.runs, workers/train_tasks.py).
TIME_LIMITS = {
    "events": 300,
    "fetch": 900,
    "embed": 900,
    "callbacks": 120,
    "maintenance": 1800,
    "crawl": 1800,
    "train": 3000,
}


# What this process could not tell Redis when its broker connection broke (Redis was
# down), for the next channel to do: messages to put back, by delivery tag (the payload,
# exchange and routing key where the message never reached the unacked hash, None where
# it did), and messages to acknowledge (their tasks finished after the connection went,
# or were rejected for good).
_TO_PUT_BACK: dict[str, tuple[dict[str, Any], str, str] | None] = {}
_TO_ACK: set[str] = set()


class _RestoringQoS(kombu_redis.QoS):
    """kombu's Redis QoS, except that what it cannot do when the connection breaks is
    done as soon as a new channel is open, instead of an hour later, or never, or by
    killing the worker (tests/test_faults.py reproduces each case on a real Redis).

    - kombu takes a message in two steps: BRPOP removes it from its queue, then a second
      command records it in the unacked hash (celery/kombu#305). When Redis goes between
      the two, the message is only in this process's memory: kombu dropped it, and the
      event it carried was never answered. It is kept for the next channel instead, and
      not handed to Celery.
    - On a lost connection Celery drops the requests it had reserved but not started
      (their tags belong to the dead channel) and kombu tries to put their messages back
      in their queues, which fails while Redis is down: they waited in the unacked hash
      for the visibility timeout (3600 s). Requests still running are left to finish.
    - Celery drops a broken connection with collect(), then close(). A channel that also
      consumes a broadcast queue (a worker's control queue) fails to close the first time;
      the second time, and when a task that ran through the outage acknowledges (or
      rejects) its message afterwards, kombu builds a client from a connection that is
      gone and raises AttributeError, which Celery calls an unrecoverable error: the
      worker exited, and every message it held waited the visibility timeout."""

    def _connection_gone(self) -> bool:
        transport = self.channel.connection
        return transport is None or transport.client is None

    def append(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except self.channel.connection.connection_errors:
            info = message.delivery_info
            _TO_PUT_BACK[delivery_tag] = (message._raw, info["exchange"], info["routing_key"])
            raise

    def ack(self, delivery_tag: str) -> None:
        self._settle(delivery_tag, partial(kombu_redis.QoS.ack, self, delivery_tag), requeue=False)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        # (a pool process lost with task_reject_on_worker_lost: its message is requeued)
        self._settle(delivery_tag, partial(kombu_redis.QoS.reject, self, delivery_tag, requeue), requeue=requeue)

    def _settle(self, delivery_tag: str, settle: Callable[[], None], *, requeue: bool) -> None:
        """``settle`` the message in Redis, or, with Redis gone, leave it to the next channel:
        to put back (``requeue``) or to acknowledge."""
        if not self._connection_gone():
            try:
                return settle()
            except self.channel.connection.connection_errors:
                pass
        if requeue:
            _TO_PUT_BACK.setdefault(delivery_tag, None)
        else:
            _TO_ACK.add(delivery_tag)
        super(kombu_redis.QoS, self).ack(delivery_tag)  # kombu's bookkeeping only, no Redis

    def restore_unacked(self, client=None):
        if client is None and self._connection_gone():
            return self._keep_for_next_channel()
        try:
            return super().restore_unacked(client)
        except self.channel.connection.connection_errors:
            return self._keep_for_next_channel()

    def _keep_for_next_channel(self):
        for tag in set(self._delivered) - _running_tags():
            _TO_PUT_BACK.setdefault(tag, None)
        self._delivered.clear()
        return []


def _running_tags() -> set[str]:
    from celery.worker.state import active_requests

    return {r.message.delivery_tag for r in tuple(active_requests)}


class _SafeRedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, except that a message it cannot even parse is dropped with
    an error in the log instead of killing the worker. Anything that can LPUSH to the
    events list (a buggy non-Python producer, `redis-cli`) could otherwise stop a worker
    with one line that is not JSON, or whose body is not base64: kombu raises in the
    worker's event loop, Celery calls it an "Unrecoverable error" and exits
    (tests/test_hostile.py). BRPOP has already removed such a message, so dropping it
    loses nothing a worker could have used."""

    QoS = _RestoringQoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            for tag in tuple(_TO_ACK):
                self.qos._remove_from_indices(tag).execute()
                _TO_ACK.discard(tag)
                logger.info("acknowledged a message whose task ended after the broker connection broke: %s", tag)
            for tag, held in tuple(_TO_PUT_BACK.items()):
                self._put_back(tag, held)
                del _TO_PUT_BACK[tag]
                logger.info("put back a message held when the broker connection broke: %s", tag)
        except self.connection.connection_errors:
            pass  # Redis went again: the next channel tries

    def _put_back(self, tag: str, held: tuple[dict[str, Any], str, str] | None) -> None:
        """Requeues message ``tag`` at the head of its queue, from the unacked hash, or
        from ``held`` (the message as BRPOP returned it) where the hash may lack it. A tag
        acked or put back meanwhile is not requeued from the hash."""
        if held is None:
            self.qos.restore_by_tag(tag)
            return

        def put_back(pipe: Any) -> None:
            pipe.multi()
            self.qos._remove_from_indices(tag, pipe)  # in case the recording did reach Redis
            self._do_restore_message(*held, pipe)

        with self.conn_or_acquire() as client:
            client.transaction(put_back, self.unacked_key)

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False):
        # kombu marks a message it puts back as redelivered, but gives up on the mark
        # when the payload has no ``headers`` (a raw message can lack them), and the
        # event tasks count a start only when it is marked (workers/tasks.py).
        properties = payload.get("properties") if isinstance(payload, dict) else None
        info = properties.get("delivery_info") if isinstance(properties, dict) else None
        if isinstance(info, dict):
            info["redelivered"] = True
        return super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (Empty, *self.connection.connection_errors, *self.connection.channel_errors):
            raise
        except Exception as exc:
            logger.error("dropped a malformed broker message: %s: %s", type(exc).__name__, exc)
            return True


class SafeRedisTransport(kombu_redis.Transport):
    """The Redis transport with :class:`_SafeRedisChannel` (``broker_transport``)."""

    Channel = _SafeRedisChannel


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("vidsim", include=["workers.tasks", "workers.train_tasks", "workers.metrics", "workers.crawl_tasks"])
    transport_options: dict[str, object] = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.embedded:
        folder = (settings.data_dir / "broker").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        broker = "filesystem://"
        transport_options.update(
            data_folder_in=str(folder), data_folder_out=str(folder), control_folder=str(folder / "control")
        )
    else:
        broker = settings.redis_url or ""  # not embedded: settings ensure a URL
        if settings.broker_prefix:
            transport_options["global_keyprefix"] = settings.broker_prefix
        app.conf.broker_transport = f"{__name__}:SafeRedisTransport"
    app.conf.update(
        broker_url=broker,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # Publishing (the chat app's publish_video_selected, and tasks enqueueing the next
        # step) rides out a broker blip: reconnect and retry for about 35 s before raising
        # to the caller. Celery's default gives up after about 0.6 s, so a Redis restart
        # made every event published meanwhile fail (tests/test_faults.py).
        task_publish_retry_policy={"max_retries": 20, "interval_start": 0, "interval_step": 0.5, "interval_max": 2},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # Postgres holds results, not the result backend
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # bounded by our own attempt counter
        worker_prefetch_multiplier=1,
        # Let a task that is running when the broker connection drops finish its work. With
        # True, Celery kills it, and as Redis is down at that moment its message cannot be
        # put back: it waits in Redis's unacked hash for the whole visibility timeout
        # (an hour), so an event in flight during a Redis restart was answered an hour
        # late (tests/test_faults.py). Finishing is safe: tasks are idempotent (unique
        # rows, the outbox lease), and the late redelivery of the message is a no-op.
        # Celery logs a CPendingDeprecationWarning on each connection loss for this.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # One direct exchange per queue, so a message lands in exactly one queue.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="maintenance",
        task_default_exchange="maintenance",
        task_default_routing_key="maintenance",
        task_routes={
            "vidsim.video_selected": {"queue": "events"},
            "vidsim.serve_event": {"queue": "events"},
            # Downloads wait on other hosts: on their own queue, in a pool of threads of
            # their own (workers/process.py), they never hold a process serving events.
            "vidsim.fetch_video": {"queue": "fetch"},
            "vidsim.embed_video": {"queue": "embed"},
            "vidsim.deliver_callback": {"queue": "callbacks"},
            "vidsim.train": {"queue": "train"},
            "vidsim.train_chunk": {"queue": "train"},
            # A crawl stage runs for up to half an hour: on its own queue it never holds
            # up the outbox sweeper or an index rebuild on `maintenance`.
            "vidsim.crawl.*": {"queue": "crawl"},
        },
        timezone="UTC",
        beat_schedule={
            "sweep-outbox": {
                "task": "vidsim.sweep_outbox",
                "schedule": settings.outbox_sweep_interval_s,
                "options": {"expires": max(settings.outbox_sweep_interval_s * 2, 1.0)},
            },
            "advance-model-rollouts": {
                "task": "vidsim.advance_rollouts",
                "schedule": settings.sweep_interval_s,
                "options": {"expires": max(settings.sweep_interval_s * 2, 1.0)},
            },
            "sweep-parked-events": {
                "task": "vidsim.sweep_parked",
                "schedule": settings.sweep_interval_s,
                "options": {"expires": max(settings.sweep_interval_s * 2, 1.0)},
            },
            "resume-stalled-training": {
                "task": "vidsim.resume_stalled_training",
                "schedule": 300.0,
                "options": {"expires": 600.0},
            },
            "refresh-index": {
                "task": "vidsim.refresh_index",
                "schedule": settings.index_rebuild_interval_s,
                "options": {"expires": settings.index_rebuild_interval_s},
            },
            "crawl-pipeline": {
                "task": "vidsim.crawl.pipeline",
                "schedule": settings.crawl_pipeline_interval_s,
                # A message that waited a whole period is stale: the next one replaces it.
                "options": {"expires": settings.crawl_pipeline_interval_s},
            },
        },
        beat_schedule_filename=str((settings.data_dir / "celerybeat-schedule").resolve()),
        worker_hijack_root_logger=False,
    )
    if not settings.embedded:
        # One effective scheduler however many `vidsim beat` run: RedBeat holds a Redis
        # lock, renewed every tick, that lapses lock_timeout after its holder dies.
        lock_timeout = settings.beat_lock_timeout_s
        app.conf.update(
            beat_scheduler="redbeat.RedBeatScheduler",
            redbeat_redis_url=settings.redis_url,
            redbeat_key_prefix=f"{settings.broker_prefix}vidsim:redbeat",
            redbeat_lock_timeout=lock_timeout,
            beat_max_loop_interval=max(1, lock_timeout // 5),
        )
    return app


celery_app = make_celery()


@setup_logging.connect
def _configure_logging(loglevel: Any = None, **_: Any) -> None:
    """Worker and beat logs in VIDSIM_LOG_FORMAT (JSON by default) instead of Celery's
    own format; the level is `--loglevel`'s. What the process prints (a task's or a
    library's ``print``) is logged too, as Celery does when it sets logging up itself
    (``worker_redirect_stdouts``): log shippers read every line of a worker as a record."""
    settings = get_settings()
    configure_logging(loglevel or settings.log_level, settings.log_format)
    if celery_app.conf.worker_redirect_stdouts:
        celery_app.log.redirect_stdouts(celery_app.conf.worker_redirect_stdouts_level)


def _say(msg: str, f: Any = sys.__stderr__) -> None:
    """Celery's ``safe_say``, which writes the worker's shutdown notices ("worker: Warm
    shutdown (MainProcess)") bare from its signal handlers, as one log record. Written
    with os.write, as Celery does: a signal handler must not re-enter a buffered stream."""
    record = logging.LogRecord(celery_worker.__name__, logging.INFO, __file__, 0, msg.strip(), None, None)
    line = formatter(get_settings().log_format).format(record) + "\n"
    with contextlib.suppress(OSError, AttributeError, ValueError):  # best effort, as Celery's
        os.write(f.fileno(), line.encode())


@celeryd_init.connect
def _log_from_the_start(options: dict[str, Any] | None = None, **_: Any) -> None:
    """A worker writes log records from its first line: Celery checks its privileges (a
    warning when run as root) before it sets logging up, and says its shutdown notices
    outside logging."""
    settings = get_settings()
    configure_logging((options or {}).get("loglevel") or settings.log_level, settings.log_format)
    celery_worker.safe_say = _say


@celeryd_after_setup.connect
def _log_start(sender: str, instance: Any, **_: Any) -> None:
    """What Celery's start-up banner says (`vidsim worker` runs without it when logs are
    JSON: the banner is not log records), as one record."""
    queues = ",".join(sorted(instance.app.amqp.queues.consume_from))
    logger.info("worker %s starting: queues %s, concurrency %s", sender, queues, instance.concurrency)


@task_prerun.connect
def _bind_task_to_logs(task_id: str, task: Any, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    """Every record a task logs carries the task, and the event it serves when there is one."""
    kwargs = kwargs or {}
    event = kwargs.get("event")
    event_id = kwargs.get("event_id") or (event.get("event_id") if isinstance(event, dict) else None)
    set_log_context(task=task.name, task_id=task_id, event_id=event_id if isinstance(event_id, str) else None)


@task_postrun.connect
def _unbind_task_from_logs(**_: Any) -> None:
    set_log_context()
