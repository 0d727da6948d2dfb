"""Events parked while their video is embedded, revisited by beat (``vidsim.sweep_parked``).

An event is parked in the transaction that asks for its video's embedding; the
embedding task serves it again. If that message never arrives (lost, or the process
crashed between the commit and the enqueue), nothing else would: the sweeper re-drives
an event parked for ``embed_requeue_after_s`` (serves it again, which answers it or asks
for the embedding anew), at most once per that interval, and answers one still parked
``parked_event_deadline_s`` after it arrived with an error, so nothing accepted goes
unanswered."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Event, utcnow
from app.serve import recommend

logger = logging.getLogger(__name__)

# Event statuses that wait on other work, not on a message of their own: its video's
# download (the `fetch` queue) or its embedding.
PARKED_STATUSES = ("fetching", "embedding")


@dataclass
class Swept:
    """What the caller enqueues once it has committed: events to serve again, and the
    outcomes (deliveries) of those answered with an error."""

    redrive: list[str] = field(default_factory=list)
    answered: list[recommend.Outcome] = field(default_factory=list)


def sweep_parked(
    *, session: Session, settings: Settings, redrive: bool, now: datetime | None = None, limit: int = 500
) -> Swept:
    """Answers the parked events past their deadline with an error and, when ``redrive``
    (the caller saw no embedding waiting to run, so theirs is lost or running), picks those
    parked too long to serve again. Rows are locked, and skipped when another sweep holds them."""
    now = now or utcnow()
    every = timedelta(seconds=settings.embed_requeue_after_s)
    deadline = timedelta(seconds=settings.parked_event_deadline_s)
    stmt = (
        select(Event)
        .where(Event.status.in_(PARKED_STATUSES), Event.received_at <= now - min(every, deadline))
        .order_by(Event.received_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    swept = Swept()
    for ev in session.scalars(stmt):
        waited = now - ev.received_at
        if waited >= deadline:
            waited_on = (
                "its video was not fetched" if ev.status == "fetching" else f"video {ev.video_id} was not embedded"
            )
            reason = f"not answered within {settings.parked_event_deadline_s:.0f} s: {waited_on} in time"
            swept.answered.append(recommend.fail_event(ev.event_id, reason, session=session))
        elif redrive and ev.status == "embedding" and waited >= every * (ev.attempts + 1):
            # (A fetch ends by itself within its download deadline and answers the event.)
            ev.attempts += 1  # re-drives so far
            swept.redrive.append(ev.event_id)
            logger.warning("event %s parked for %.0f s waiting for video %s: serving it again (re-drive %d)",
                           ev.event_id, waited.total_seconds(), ev.video_id, ev.attempts)  # fmt: skip
    return swept
