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

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Sessions
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


def create_delivery(rec: Recommendation, *, session: Session, url: str, body: dict[str, Any], lease_s: float) -> Leased:
    """The recommendation's delivery, pending, due now and leased to the caller for its
    first attempt (flushed, not committed): the sweeper leaves it alone until the lease
    lapses, so the first attempt is never made twice at once."""
    now = utcnow()
    delivery = Delivery(
        recommendation_id=rec.id,
        url=url,
        webhook_id=webhook_id_for(rec.event_id),
        body=json.dumps(body, separators=(",", ":"), sort_keys=True),
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


def attempt_leased(leased: Leased, *, sessions: Sessions, settings: Settings) -> Delivery:
    """The attempt of a delivery this caller holds the lease of (:func:`create_delivery`),
    outside any transaction, then its record in a unit of work of its own."""
    result = attempt(leased, settings=settings)
    with sessions() as session:
        return record(leased.id, result, session=session, settings=settings)


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
    session.add(
        DeliveryAttempt(
            delivery_id=delivery.id,
            attempt=delivery.attempts,
            status_code=result.status_code,
            error=result.error,
            duration_ms=result.duration_ms,
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
            delivery.delivered_at = utcnow()
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
            delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
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
