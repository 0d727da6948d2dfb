"""The callback outbox: every recommendation gets one signed delivery, attempted now and
retried on a schedule kept in the database. Workers claim a row with a lease, so a
delivery is never attempted twice at once, even when the sweeper enqueues it again.

A new delivery is created already leased to the task that made it, which makes the first
attempt itself right after its transaction commits (:func:`attempt_leased`): no second
task, and no sweep can take the row while that attempt is in flight. Should that task
die before recording the attempt, the lease lapses and the sweeper retries the row."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, or_, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Sessions, autocommit, get_engine
from app.deliver.attempt import DeliveryResult, deliver, next_delay_s
from app.metrics import DELIVERIES, EVENT_TO_CALLBACK
from app.models import Delivery, DeliveryAttempt, Event, Recommendation, utcnow

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult

logger = logging.getLogger(__name__)

_WEBHOOK_NS = uuid.UUID("6f1d8a52-3c1e-4f0e-9a57-6a1f4b8de0c1")


def webhook_id_for(event_id: str) -> str:
    """Stable per event: a receiver drops duplicates by it (Standard Webhooks ``webhook-id``)."""
    return f"msg_{uuid.uuid5(_WEBHOOK_NS, event_id).hex}"


def lease_s(settings: Settings) -> float:
    """How long one attempt holds its delivery: longer than an attempt can take (connect
    and read timeouts, the database), so that no other worker attempts it meanwhile."""
    return settings.callback_timeout_s * 2 + 30


@dataclass(frozen=True)
class Leased:
    """A delivery leased to its holder for one attempt: what the attempt sends, and the
    lease (the token a task it is handed to claims it with, :func:`claim`)."""

    id: int
    url: str
    webhook_id: str
    body: str
    lease_until: datetime


def encode_body(body: dict[str, Any]) -> str:
    """A callback's body as sent, frozen in the outbox: every attempt sends these bytes."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def create_delivery(rec: Recommendation, *, session: Session, url: str, body: dict[str, Any], lease_s: float) -> Leased:
    """The recommendation's delivery, pending, due now and leased to the caller for its
    first attempt (flushed, not committed): the sweeper leaves it alone until the lease
    lapses, so the first attempt is never made twice at once."""
    now = utcnow()
    delivery = Delivery(
        recommendation_id=rec.id,
        url=url,
        webhook_id=webhook_id_for(rec.event_id),
        body=encode_body(body),
        status="pending",
        next_attempt_at=now,
        lease_until=now + timedelta(seconds=lease_s),
    )
    session.add(delivery)
    session.flush()
    assert delivery.lease_until is not None  # just set
    return Leased(delivery.id, delivery.url, delivery.webhook_id, delivery.body, delivery.lease_until)


def claim(delivery_id: int, *, session: Session, lease_s: float, token: datetime | None = None) -> Delivery | None:
    """Takes a due delivery for one attempt, or returns None if it is not due, finished,
    or leased by another worker. Commit right after, before the HTTP call. ``token`` is
    the lease :func:`take_due` put on the delivery when the sweeper enqueued this attempt:
    the task carrying it may take the delivery over."""
    now = utcnow()
    free = or_(Delivery.lease_until.is_(None), Delivery.lease_until < now)
    if token is not None:
        free = or_(free, Delivery.lease_until == token)
    statement = (
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.status == "pending",
            Delivery.next_attempt_at <= now,
            free,
        )
        .values(lease_until=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    taken = cast("CursorResult[Any]", session.execute(statement)).rowcount  # an UPDATE: rowcount is set
    if not taken:
        return None
    return session.get(Delivery, delivery_id, populate_existing=True)


def attempt(delivery: Delivery | Leased, *, settings: Settings) -> DeliveryResult:
    """One HTTP attempt, outside any transaction."""
    return deliver(
        url=delivery.url,
        msg_id=delivery.webhook_id,
        body=delivery.body.encode(),
        secrets=settings.webhook_secrets,
        allow_private=settings.callback_allow_private,
        timeout_s=settings.callback_timeout_s,
    )


def attempt_leased(leased: Leased, *, sessions: Sessions, settings: Settings) -> DeliveryResult:
    """The attempt of a delivery this caller holds the lease of (:func:`create_delivery`),
    outside any transaction, then its record: a success in one statement that commits
    by itself (:func:`record_delivered`), anything else in a unit of work of ``sessions``."""
    result = attempt(leased, settings=settings)
    if result.ok and get_engine().dialect.name == "postgresql":
        # Most attempts: one statement, which commits by itself (no unit of work needed).
        with autocommit() as conn:
            record_delivered(leased.id, result, conn=conn)
        return result
    with sessions() as session:
        record(leased.id, result, session=session, settings=settings)
    return result


# An attempt that succeeded, stored: the delivery delivered (when first delivered, if it
# was before: a replay), and the attempt numbered after the ones before it.
_RECORD_DELIVERED = """
WITH delivered AS (
    UPDATE deliveries
    SET attempts = attempts + 1, status = 'delivered', next_attempt_at = NULL, lease_until = NULL,
        last_status_code = %(status_code)s, last_error = NULL, delivered_at = COALESCE(delivered_at, %(now)s)
    WHERE id = %(id)s
    RETURNING id, recommendation_id, attempts, delivered_at
), attempted AS (
    INSERT INTO delivery_attempts (delivery_id, attempt, status_code, error, duration_ms, attempted_at)
    SELECT id, attempts, %(status_code)s, NULL, %(duration_ms)s, %(now)s FROM delivered
)
SELECT d.attempts, d.delivered_at, e.received_at
FROM delivered AS d
LEFT JOIN recommendations AS r ON r.id = d.recommendation_id
LEFT JOIN events AS e ON e.event_id = r.event_id
"""


def record_delivered(delivery_id: int, result: DeliveryResult, *, conn: Connection) -> None:
    """:func:`record` of a successful attempt, on Postgres, in one statement: the SQL sent
    on the connection as it is, no ORM object (the warm path's last write, after
    :func:`app.serve.queries.store_warm_answer`)."""
    assert result.ok
    now = utcnow()
    row = conn.connection.driver_connection.execute(  # type: ignore[union-attr]
        _RECORD_DELIVERED,
        {"id": delivery_id, "status_code": result.status_code, "duration_ms": result.duration_ms, "now": now},
    ).fetchone()
    if row is None:  # deleted meanwhile (an operator): nothing to record
        return
    attempts, delivered_at, received_at = row
    DELIVERIES.labels("delivered").inc()
    if delivered_at == now and received_at is not None:  # its first answer
        EVENT_TO_CALLBACK.observe((now - received_at).total_seconds())
    logger.info("delivery %d attempt %d -> delivered (%s)", delivery_id, attempts, result.status_code)


def record(delivery_id: int, result: DeliveryResult, *, session: Session, settings: Settings) -> Delivery:
    """Stores the attempt and moves the delivery on: delivered, disabled (410), scheduled
    again, or dead after the last attempt of the schedule."""
    # The delivery, locked, and when its event was received (for the latency metric).
    delivery, received_at = session.execute(
        select(Delivery, Event.received_at)
        .join(Recommendation, Recommendation.id == Delivery.recommendation_id)
        .join(Event, Event.event_id == Recommendation.event_id)
        .where(Delivery.id == delivery_id)
        .with_for_update(of=Delivery)
        .execution_options(populate_existing=True)
    ).one()
    delivery.attempts += 1
    # One clock reading for the attempt's record and what it schedules: the next attempt
    # is the schedule's delay after this one, not after the row happens to be flushed.
    now = utcnow()
    session.add(
        DeliveryAttempt(
            delivery_id=delivery.id,
            attempt=delivery.attempts,
            status_code=result.status_code,
            error=result.error,
            duration_ms=result.duration_ms,
            attempted_at=now,
        )
    )
    delivery.last_status_code, delivery.last_error, delivery.lease_until = (
        result.status_code,
        result.error,
        None,
    )
    if result.ok:
        delivery.status, delivery.next_attempt_at = "delivered", None
        # delivered_at and the event's latency are those of its first answer: an operator's
        # replay of a delivered callback is one more attempt, not a second event.
        if delivery.delivered_at is None:
            delivery.delivered_at = now
            if received_at is not None:
                EVENT_TO_CALLBACK.observe((delivery.delivered_at - received_at).total_seconds())
    elif result.disable:
        delivery.status, delivery.next_attempt_at = "disabled", None
    elif (result.error or "").startswith("blocked: "):
        # Refused by policy before connecting (scheme, credentials in the URL, a private,
        # loopback or metadata address): no later attempt can succeed, so dead-letter it
        # now instead of retrying it for days (tests/test_hostile.py). An operator who
        # changes the policy can still `vidsim deliveries replay` it.
        delivery.status, delivery.next_attempt_at = "dead", None
    else:
        delay = next_delay_s(
            delivery.attempts, schedule=settings.callback_retry_schedule, retry_after_s=result.retry_after_s
        )
        if delay is None:
            delivery.status, delivery.next_attempt_at = "dead", None
        else:
            delivery.next_attempt_at = now + timedelta(seconds=delay)
    DELIVERIES.labels("retry" if delivery.status == "pending" else delivery.status).inc()
    logger.info(
        "delivery %d attempt %d -> %s (%s)",
        delivery.id,
        delivery.attempts,
        delivery.status,
        result.error or result.status_code,
    )
    session.flush()
    return delivery


def take_due(*, session: Session, lease_s: float, limit: int = 500) -> list[tuple[int, datetime]]:
    """For the sweeper: the due deliveries no worker holds, each leased for ``lease_s``,
    as (id, lease) pairs; the lease is the token its enqueued task claims with.

    The lease is what keeps the next sweeps from enqueueing the same delivery again while
    its task waits in a busy queue. Without it every sweep enqueued every due delivery
    anew, so a callbacks queue a few sweep intervals behind grew with each sweep: 27,000
    deliver tasks for 500 events in the kill -9 soak, and latency collapsing at 16
    events/s under load (tests/test_faults.py, scripts/load.py). Should the task be lost,
    the lease lapses and a later sweep enqueues the delivery again."""
    now = utcnow()
    free = or_(Delivery.lease_until.is_(None), Delivery.lease_until < now)
    due_now = (Delivery.status == "pending", Delivery.next_attempt_at <= now, free)
    oldest = select(Delivery.id).where(*due_now).order_by(Delivery.next_attempt_at).limit(limit)
    rows = session.execute(
        update(Delivery)
        .where(Delivery.id.in_(oldest.scalar_subquery()), *due_now)  # re-checked row by row: one sweeper wins
        .values(lease_until=now + timedelta(seconds=lease_s))
        .returning(Delivery.id, Delivery.lease_until)
        .execution_options(synchronize_session=False)
    ).all()
    return [(delivery_id, cast(datetime, lease)) for delivery_id, lease in rows]  # just set: never None


def replay(delivery_id: int, *, session: Session) -> Delivery:
    """Operator action: send a delivery again now, whatever its state (same webhook id)."""
    delivery = session.get_one(Delivery, delivery_id)
    delivery.status, delivery.next_attempt_at, delivery.lease_until = "pending", utcnow(), None
    session.flush()
    return delivery
