"""The video-selected event: the one message the chat app publishes.

JSON, carried as the single keyword argument ``event`` of the Celery task
``vidsim.video_selected`` on the ``events`` queue (see README, "Event contract")::

    {"event_id": "chat-42-msg-7",          # client-chosen idempotency key
     "video_id": 17,                        # a library video ...
     "video_uri": "https://cdn/x.mp4",      # ... or a video not yet in the library
     "k": 5,                                # optional, default 5
     "callback_url": "https://chat.example.com/hooks/vidsim",
     "collection": "acme-sales"}            # optional: recommend only from this collection
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_EVENT_BYTES = 16 * 1024


class InvalidEvent(ValueError):
    """An event that cannot be served; str() is the readable reason."""


class VideoSelected(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    event_id: str = Field(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")
    video_id: int | None = Field(default=None, ge=1)
    video_uri: str | None = Field(default=None, min_length=1, max_length=4096)
    k: int = Field(default=5, ge=1)
    callback_url: str = Field(min_length=1, max_length=2048)
    collection: str | None = Field(default=None, max_length=200)
    # Leave out results flagged as near-duplicates of the query (re-uploads, edits).
    exclude_near_duplicates: bool = False

    @model_validator(mode="after")
    def _one_video(self) -> VideoSelected:
        if (self.video_id is None) == (self.video_uri is None):
            raise ValueError("give exactly one of video_id or video_uri")
        return self


def parse_event(raw: Any, *, max_k: int) -> VideoSelected:
    """Validates a raw event (dict or JSON text); raises InvalidEvent with one readable line."""
    if isinstance(raw, str | bytes):
        if len(raw) > MAX_EVENT_BYTES:
            raise InvalidEvent(f"event is {len(raw)} bytes, over the {MAX_EVENT_BYTES}-byte limit")
        try:
            event = VideoSelected.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidEvent(_reason(exc)) from None
    elif isinstance(raw, dict):
        if len(repr(raw)) > MAX_EVENT_BYTES:
            raise InvalidEvent(f"event is over the {MAX_EVENT_BYTES}-byte limit")
        try:
            event = VideoSelected.model_validate(raw)
        except ValidationError as exc:
            raise InvalidEvent(_reason(exc)) from None
    else:
        raise InvalidEvent(f"event must be a JSON object, got {type(raw).__name__}")
    if event.k > max_k:
        raise InvalidEvent(f"k={event.k} is over the limit of {max_k}")
    return event


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{where}: {err['msg']}")
    return "invalid event: " + "; ".join(parts)
