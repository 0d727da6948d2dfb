"""Publishing a video-selected event, for Python chat apps::

    from workers.publish import publish_video_selected
    publish_video_selected(event_id="chat-42-msg-7", video_id=17,
                           callback_url="https://chat.example.com/hooks/vidsim")

Producers in other languages push the raw Celery message documented in the README.
"""

from __future__ import annotations

import uuid
from typing import Any

from workers.app import celery_app

EVENT_TASK = "vidsim.video_selected"


def publish_video_selected(
    *,
    callback_url: str,
    video_id: int | None = None,
    video_uri: str | None = None,
    event_id: str | None = None,
    k: int | None = None,
    collection: str | None = None,
) -> str:
    """Publishes one event on the ``events`` queue and returns its event id. Publishing
    the same ``event_id`` again is safe: vidsim answers each event id once."""
    if (video_id is None) == (video_uri is None):
        raise ValueError("give exactly one of video_id or video_uri")
    event: dict[str, Any] = {
        "event_id": event_id or f"evt-{uuid.uuid4().hex}",
        "callback_url": callback_url,
    }
    if video_id is not None:
        event["video_id"] = video_id
    if video_uri is not None:
        event["video_uri"] = video_uri
    if k is not None:
        event["k"] = k
    if collection is not None:
        event["collection"] = collection
    celery_app.send_task(EVENT_TASK, kwargs={"event": event}, queue="events")
    return str(event["event_id"])
