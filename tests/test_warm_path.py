"""The warm path's own statements (app.serve.queries.record_warm_event and
store_warm_answer, app.deliver.outbox.record_delivered, app.task_attempts) against the
general path they stand in for, on real Postgres, with no worker: the rows an event
leaves, one recommendation per event however often it is delivered or raced, and a
delivery recorded as the general path records it."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from app.db import autocommit, session_scope
from app.deliver import outbox
from app.learn.registry import active_model
from app.models import Delivery, DeliveryAttempt, Embedding, Event, Recommendation, Video, utcnow
from app.serve import queries, recommend
from app.serve.events import VideoSelected
from app.task_attempts import count_start


@pytest.fixture(scope="module")
def library(settings) -> list[int]:  # type: ignore[no-untyped-def]
    """Five library videos with random unit vectors for the active model, indexed."""
    from app.index.rebuild import rebuild_index

    rng = np.random.default_rng(7)
    with session_scope() as s:
        model = active_model(session=s)
        videos = [Video(uri=f"test://warm/{uuid.uuid4().hex}", status="ready") for _ in range(5)]
        s.add_all(videos)
        s.flush()
        for video in videos:
            vec = rng.standard_normal(model.dim).astype(np.float32)
            vec /= np.linalg.norm(vec)
            s.add(
                Embedding(video_id=video.id, model_version_id=model.id, vector=vec.tobytes(), dim=model.dim, frames=1)
            )
        s.flush()
        rebuild_index(session=s, model=model, settings=settings)
        return [v.id for v in videos]


def _event(video_id: int, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"warm-{uuid.uuid4().hex}",
        "video_id": video_id,
        "callback_url": "http://127.0.0.1:9/x",
        **extra,
    }


def _rows(event_id: str) -> tuple[Event, list[Recommendation], list[Delivery]]:
    with session_scope() as s:
        recs = list(s.scalars(select(Recommendation).where(Recommendation.event_id == event_id)))
        deliveries = list(s.scalars(select(Delivery).join(Recommendation).where(Recommendation.event_id == event_id)))
        return s.get_one(Event, event_id), recs, deliveries


def test_a_warm_event_leaves_the_rows_and_body_the_general_path_would(library: list[int], settings) -> None:  # type: ignore[no-untyped-def]
    event = _event(library[0], k=3)
    with session_scope() as s:
        outcome = recommend.accept_event(event, session=s, settings=settings, fallback_id="x")
    assert outcome.leased is not None and outcome.delivery_id == outcome.leased.id

    ev, [rec], [delivery] = _rows(event["event_id"])
    assert (ev.status, ev.error, ev.video_id) == ("served", None, library[0])
    assert ev.completed_at is not None and ev.payload["video_id"] == library[0] and ev.k == 3
    assert rec.query_video_id == library[0] and rec.error is None and rec.search_ms is not None
    assert len(rec.results["items"]) == 3 and library[0] not in {r["video_id"] for r in rec.results["items"]}
    assert delivery.status == "pending" and delivery.attempts == 0 and delivery.next_attempt_at is not None
    assert delivery.webhook_id == outbox.webhook_id_for(event["event_id"])
    assert delivery.lease_until == outcome.leased.lease_until
    assert delivery.body == outcome.leased.body and delivery.url == event["callback_url"]
    with session_scope() as s:
        model = s.get_one(type(active_model(session=s)), rec.model_version_id)
        assert model.id == active_model(session=s).id
        general = recommend.callback_body(ev, rec, query=s.get_one(Video, library[0]), model=model)
    assert json.loads(delivery.body) == general
    assert general["index_version"] == rec.index_version_id is not None


def test_a_redelivered_warm_event_keeps_its_one_recommendation(library: list[int], settings) -> None:  # type: ignore[no-untyped-def]
    event = _event(library[1])
    with session_scope() as s:
        first = recommend.accept_event(event, session=s, settings=settings, fallback_id="x")
    for _ in range(2):  # the same message again (acks late), and republished
        with session_scope() as s:
            again = recommend.accept_event(event, session=s, settings=settings, fallback_id="x")
        assert again.leased is None and again.delivery_id == first.delivery_id  # still pending: the same one
    _, recs, deliveries = _rows(event["event_id"])
    assert len(recs) == 1 and [d.id for d in deliveries] == [first.delivery_id]


def test_an_event_answered_meanwhile_is_not_answered_twice(library: list[int], settings) -> None:  # type: ignore[no-untyped-def]
    """A message served twice at once: the second store waits for the first transaction's
    recommendation, then writes nothing (not the event's status, not a delivery)."""
    raw = _event(library[2])
    event = VideoSelected.model_validate(raw)
    with session_scope() as s:
        query = queries.record_warm_event(event, session=s)
    assert isinstance(query, queries.WarmQuery)

    def store(session: Any) -> int | None:
        return queries.store_warm_answer(
            event.event_id, session=session, query=query, index_version_id=None, results=[], search_ms=1.0,
            url=event.callback_url, webhook_id=outbox.webhook_id_for(event.event_id), body="{}",
            lease_until=utcnow(),
        )  # fmt: skip

    second: list[int | None] = []
    with session_scope() as first:
        assert store(first) is not None  # not committed yet
        racer = threading.Thread(target=lambda: second.append(_store_in_own_session(store)))
        racer.start()
        racer.join(timeout=1.0)
        assert racer.is_alive()  # waits on the first transaction's row
    racer.join(timeout=30)
    assert second == [None]
    _, recs, deliveries = _rows(event.event_id)
    assert len(recs) == 1 and len(deliveries) == 1

    # Served again by the general path, it finds the one answer.
    with session_scope() as s:
        outcome = recommend.serve_event(event.event_id, session=s, settings=settings)
    assert outcome.delivery_id == deliveries[0].id
    assert len(_rows(event.event_id)[1]) == 1


def _store_in_own_session(store: Any) -> int | None:
    with session_scope() as s:
        return store(s)  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", ["unknown", "failed", "not embedded"])
def test_an_event_the_warm_path_cannot_search_is_answered_by_the_general_one(case: str, settings) -> None:  # type: ignore[no-untyped-def]
    with session_scope() as s:
        video = Video(uri=f"test://warm/{uuid.uuid4().hex}", status="failed" if case == "failed" else "ready",
                      error="not a video" if case == "failed" else None)  # fmt: skip
        s.add(video)
        s.flush()
        video_id = video.id if case != "unknown" else 987_654_321
    event = _event(video_id)
    with session_scope() as s:
        outcome = recommend.accept_event(event, session=s, settings=settings, fallback_id="x")
    ev, recs, deliveries = _rows(event["event_id"])
    if case == "not embedded":  # asked for, and parked meanwhile
        assert outcome.embed_video_id == video_id and ev.status == "embedding" and not recs
        return
    assert ev.status == "failed" and len(recs) == 1 and len(deliveries) == 1
    assert recs[0].error == (f"unknown video id {video_id}" if case == "unknown" else f"video {video_id}: not a video")


def test_a_successful_attempt_is_recorded_as_the_general_path_records_it(
    library: list[int], settings, receiver
) -> None:  # type: ignore[no-untyped-def]
    event = _event(library[3], callback_url=receiver.url)
    with session_scope() as s:
        outcome = recommend.accept_event(event, session=s, settings=settings, fallback_id="x")
    assert outcome.leased is not None
    result = outbox.attempt_leased(outcome.leased, sessions=session_scope, settings=settings)
    assert result.ok
    received = receiver.wait_for({event["event_id"]}, timeout_s=10)[event["event_id"]]
    assert received.webhook_id == outbox.webhook_id_for(event["event_id"])

    with session_scope() as s:
        delivery = s.get_one(Delivery, outcome.leased.id)
        assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 1, 200)
        assert delivery.lease_until is None and delivery.next_attempt_at is None and delivery.last_error is None
        first_delivered = delivery.delivered_at
        assert first_delivered is not None
        outbox.replay(outcome.leased.id, session=s)
    # A replay is one more attempt: numbered after the first, first delivery time kept.
    outbox.attempt_leased(outcome.leased, sessions=session_scope, settings=settings)
    with session_scope() as s:
        delivery = s.get_one(Delivery, outcome.leased.id)
        assert (delivery.status, delivery.attempts, delivery.delivered_at) == ("delivered", 2, first_delivered)
        attempts = s.scalars(
            select(DeliveryAttempt.attempt)
            .where(DeliveryAttempt.delivery_id == delivery.id)
            .order_by(DeliveryAttempt.id)
        )
        assert list(attempts) == [1, 2]


def test_task_starts_are_counted_and_committed_at_once() -> None:
    task_id = f"task-{uuid.uuid4().hex}"
    with autocommit() as conn:
        assert count_start(conn, task_id=task_id, name="vidsim.test") == 1
    with autocommit() as conn:
        assert count_start(conn, task_id=task_id, name="vidsim.test") == 2
        # Committed already, whatever happens next on this connection.
        with session_scope() as s:
            from app.models import TaskAttempt

            assert s.scalar(select(func.max(TaskAttempt.attempts)).where(TaskAttempt.task_id == task_id)) == 2


def test_an_event_task_writes_no_first_start_and_still_gives_up_a_crash_loop(settings) -> None:  # type: ignore[no-untyped-def]
    """The event tasks skip the statement for a message's first start; a redelivered one
    (the broker marks it) is written with that first start counted, and the message is
    given up after the same number of starts as any task's (tests/test_faults.py runs it
    on a real worker whose process the event kills)."""
    from app.models import TaskAttempt
    from workers.tasks import _process_died_too_often, video_selected

    task_id = f"task-{uuid.uuid4().hex}"

    def start(**request: Any) -> bool:
        video_selected.push_request(id=task_id, **request)
        try:
            return _process_died_too_often(video_selected, write_first_start=False)
        finally:
            video_selected.pop_request()

    def written() -> int | None:
        with session_scope() as s:
            return s.scalar(select(TaskAttempt.attempts).where(TaskAttempt.task_id == task_id))

    assert start(delivery_info={"redelivered": False}) is False
    assert written() is None
    gave_up = [start(delivery_info={"redelivered": True}) for _ in range(settings.task_max_attempts)]
    assert written() == settings.task_max_attempts + 1  # the unwritten first start counted
    assert gave_up == [False] * (settings.task_max_attempts - 1) + [True]
    # A retry (a new message under the same id) is written even when not redelivered.
    task_id = f"task-{uuid.uuid4().hex}"
    assert start(retries=1, delivery_info={"redelivered": False}) is False
    assert written() == 2


def _backend_pid(conn: Any) -> int:
    return int(conn.connection.driver_connection.info.backend_pid)


def _terminate(pid: int) -> None:
    """Ends the Postgres session ``pid`` from another connection, as a restart would
    (its FATAL message and the close reach the client), and waits until they have."""
    import os
    import time

    import psycopg

    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))  # waits for the session's end
    time.sleep(0.05)  # (the close crossing the loopback)


def test_a_connection_checked_out_again_at_once_is_not_pinged() -> None:
    """No round trip for the check of a connection back from a task a moment ago: the
    three checkouts of a warm event cost no ping (pool_pre_ping sent one each)."""
    with autocommit() as conn:
        pid = _backend_pid(conn)
    with autocommit() as conn:
        assert _backend_pid(conn) == pid  # the same pooled connection
        assert conn.connection._connection_record.info["pinged"] is False  # type: ignore[union-attr]


@pytest.mark.parametrize("path", ["autocommit", "session"])
def test_a_connection_its_server_ended_while_pooled_is_replaced_at_checkout(library: list[int], settings,  # type: ignore[no-untyped-def]
                                                                            path: str) -> None:  # fmt: skip
    """A pooled connection whose Postgres session ended while it sat in the pool (a
    Postgres restart, pg_terminate_backend), however short the wait, is found dead and
    replaced when checked out: the task's statements run on a new connection, none fails."""
    with autocommit() as conn:
        pid = _backend_pid(conn)
    _terminate(pid)
    if path == "autocommit":
        with autocommit() as conn:
            assert _backend_pid(conn) != pid
            assert conn.connection._connection_record.info["pinged"] is False  # type: ignore[union-attr]  # (fresh)
            assert count_start(conn, task_id=f"task-{uuid.uuid4().hex}", name="vidsim.test") == 1
    else:
        event = _event(library[0])
        with session_scope() as s:
            outcome = recommend.accept_event(event, session=s, settings=settings, fallback_id="x")
            assert _backend_pid(s.connection()) != pid
        assert outcome.leased is not None
        _, [_rec], [_delivery] = _rows(event["event_id"])


def test_a_connection_broken_under_a_statement_is_retried_as_a_database_outage() -> None:
    """A connection that breaks under one of the warm path's statements, sent on the
    driver's connection as they are, raises psycopg's error, not SQLAlchemy's: the task
    is retried while the database is down as for SQLAlchemy's (workers/tasks.py), and the
    broken connection is not given to the next checkout."""
    import psycopg

    from workers.tasks import DATABASE_DOWN

    with autocommit() as conn:
        pid = _backend_pid(conn)
    with pytest.raises(DATABASE_DOWN), autocommit() as conn:
        assert _backend_pid(conn) == pid
        _terminate(pid)
        conn.connection.driver_connection.execute("SELECT 1")  # type: ignore[union-attr]
    assert issubclass(psycopg.errors.AdminShutdown, DATABASE_DOWN)
    with autocommit() as conn:
        assert _backend_pid(conn) != pid
        assert count_start(conn, task_id=f"task-{uuid.uuid4().hex}", name="vidsim.test") == 1
