"""`vidsim publish` and `vidsim deliveries ...`: send an event in as the chat app does, and
inspect or replay the signed callbacks that answer it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from scripts.commands.common import Fail, console, db_session

deliveries_app = typer.Typer(no_args_is_help=True, help="Inspect and replay callback deliveries.")


def publish(
    video: Annotated[str, typer.Option(help="A library video id, or a video URI/path.")],
    callback_url: Annotated[str, typer.Option(help="Where vidsim POSTs the answer.")],
    event_id: Annotated[str | None, typer.Option(help="Idempotency key (default: random).")] = None,
    k: Annotated[int | None, typer.Option(help="How many videos to recommend.")] = None,
    collection: Annotated[str | None, typer.Option(help="Recommend only from this collection.")] = None,
) -> None:
    """Publish a video-selected event, as the chat app does."""
    from workers.publish import publish_video_selected

    target = {"video_id": int(video)} if video.isdigit() else {"video_uri": video}
    sent = publish_video_selected(callback_url=callback_url, event_id=event_id, k=k, collection=collection, **target)
    console.print(f"published event {sent}")


@deliveries_app.command("list")
def deliveries_list(
    status: Annotated[str | None, typer.Option(help="pending, delivered, dead or disabled.")] = None,
    limit: int = 30,
) -> None:
    """Recent callback deliveries and their state."""
    from app.ops.queries import recent_deliveries

    with db_session() as session:
        rows = recent_deliveries(session=session, status=status, limit=limit)
    table = Table("id", "event", "status", "attempts", "last", "next attempt", "url")
    for d, event_id in rows:
        table.add_row(
            str(d.id), event_id, d.status, str(d.attempts),
            d.last_error or str(d.last_status_code or ""),
            f"{d.next_attempt_at:%H:%M:%S}" if d.next_attempt_at else "", d.url,
        )  # fmt: skip
    console.print(table)


@deliveries_app.command("replay")
def deliveries_replay(delivery_id: int) -> None:
    """Send a delivery again now (same webhook id, so receivers can deduplicate)."""
    from sqlalchemy.exc import NoResultFound

    from app.deliver import outbox
    from workers.tasks import deliver_callback

    with db_session() as session:
        try:
            outbox.replay(delivery_id, session=session)
        except NoResultFound:
            raise Fail(f"unknown delivery id {delivery_id}", "see `vidsim deliveries list`") from None
    deliver_callback.delay(delivery_id)
    console.print(f"delivery {delivery_id} queued again")
