"""The results page: each event's query frames beside its recommended videos, with
thumbnails, scores, where in each video the match is (the query's matched frame beside
the result's) and the callback delivery history. Static HTML, files beside it."""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.media import video as video_io
from app.media.video import decode_limits
from app.models import Delivery, DeliveryAttempt, Event, Recommendation, Video

logger = logging.getLogger(__name__)


@dataclass
class ResultCard:
    rank: int
    video_id: int
    uri: str
    score: float
    thumb: str | None
    expected: bool = False
    near_duplicate: bool = False
    match: float | None = None
    spans: str | None = None  # "query 3.0-7.0 s = 12.0-16.0 s here"
    matched: tuple[str, str] | None = None  # the query's frame and this video's, mid-match


# Results per event whose matched frames are drawn (each is two short decodes).
MATCHED_FRAMES_FOR = 3


@dataclass
class EventCard:
    event_id: str
    status: str
    error: str | None
    query_uri: str | None
    query_frames: list[str]
    results: list[ResultCard]
    deliveries: list[dict] = field(default_factory=list)
    note: str | None = None


def _save_jpeg(frame: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(path, quality=85)


def _frames(video: Video, *, settings: Settings, count: int, out: Path, stem: str) -> list[str]:
    """Writes up to ``count`` evenly spaced frames of a video as JPEGs; relative paths."""
    existing = sorted(out.glob(f"{stem}-*.jpg"))
    if len(existing) >= count:
        return [f"thumbs/{p.name}" for p in existing[:count]]
    try:
        sample = video_io.sample_frames(
            video.local_path or video.uri, fps=1.0, size=160, max_frames=count, limits=decode_limits(settings)
        )
    except video_io.VideoError as exc:
        logger.warning("no thumbnails for video %d: %s", video.id, exc.reason)
        return []
    names = []
    for i, frame in enumerate(sample.frames[:count]):
        name = f"{stem}-{i}.jpg"
        _save_jpeg(frame, out / name)
        names.append(f"thumbs/{name}")
    return names


def _frame_at(video: Video, at_s: float, *, settings: Settings, out: Path, stem: str) -> str | None:
    """One frame of a video at ``at_s`` seconds as a JPEG; its relative path. A time in
    its last second or past its end (a span ends one sampling period after its last
    frame, so the middle of a one-frame span at the end can be) shows its last second."""
    if video.duration_s:
        at_s = min(at_s, max(0.0, float(video.duration_s) - 1.0))
    name = f"{stem}-at{at_s:.1f}.jpg"
    if not (out / name).is_file():
        try:
            sample = video_io.sample_frames(video.local_path or video.uri, fps=1.0, size=160, max_frames=1,
                                            start_s=max(0.0, at_s), duration_s=1.0,
                                            limits=decode_limits(settings))  # fmt: skip
        except video_io.VideoError as exc:
            logger.warning("no frame at %.1fs of video %d: %s", at_s, video.id, exc.reason)
            return None
        _save_jpeg(sample.frames[0], out / name)
    return f"thumbs/{name}"


def _matched(
    query: Video | None, video: Video | None, item: dict, *, settings: Settings, out: Path
) -> tuple[str | None, tuple[str, str] | None]:
    """The matched spans of a result as text, and the middle frame of each span."""
    spans = [item.get(k) for k in ("query_start_s", "query_end_s", "start_s", "end_s")]
    if any(v is None for v in spans):
        return None, None
    q0, q1, s0, s1 = (float(v) for v in spans if v is not None)
    text = f"query {q0:.1f}-{q1:.1f} s = {s0:.1f}-{s1:.1f} s here"
    if query is None or video is None:
        return text, None
    mid_q, mid_s = (q0 + q1) / 2, (s0 + s1) / 2
    q = _frame_at(query, mid_q, settings=settings, out=out, stem=f"v{query.id}")
    r = _frame_at(video, mid_s, settings=settings, out=out, stem=f"v{video.id}")
    return text, (q, r) if q and r else None


def write_results_page(
    out_dir: Path,
    *,
    session: Session,
    settings: Settings,
    event_ids: list[str] | None = None,
    limit: int = 50,
    expected: dict[str, int] | None = None,
    notes: dict[str, str] | None = None,
    title: str = "vidsim recommendations",
) -> Path:
    """Writes ``out_dir/index.html`` for the given events (default: the latest ``limit``).
    ``expected`` marks a known right answer per event (the demo's edited copies)."""
    thumbs = out_dir / "thumbs"
    stmt = select(Event).order_by(Event.received_at.desc()).limit(limit)
    if event_ids is not None:
        stmt = select(Event).where(Event.event_id.in_(event_ids))
    events = list(session.scalars(stmt))
    if event_ids is not None:
        order = {e: i for i, e in enumerate(event_ids)}
        events.sort(key=lambda e: order.get(e.event_id, 0))
    cards = []
    for ev in events:
        rec = session.scalar(select(Recommendation).where(Recommendation.event_id == ev.event_id))
        query = session.get(Video, ev.video_id) if ev.video_id else None
        query_frames = _frames(query, settings=settings, count=6, out=thumbs, stem=f"v{query.id}") if query else []
        results = []
        for item in rec.results.get("items", []) if rec else []:
            video = session.get(Video, item["video_id"])
            thumb = _frames(video, settings=settings, count=6, out=thumbs, stem=f"v{video.id}") if video else []
            spans, matched = None, None
            if item["rank"] <= MATCHED_FRAMES_FOR:
                spans, matched = _matched(query, video, item, settings=settings, out=thumbs)
            results.append(
                ResultCard(
                    rank=item["rank"],
                    video_id=item["video_id"],
                    uri=item["uri"],
                    score=item["score"],
                    near_duplicate=bool(item.get("near_duplicate")),
                    thumb=thumb[len(thumb) // 2] if thumb else None,
                    expected=bool(expected and expected.get(ev.event_id) == item["video_id"]),
                    match=item.get("match"),
                    spans=spans,
                    matched=matched,
                )
            )
        deliveries = []
        if rec is not None:
            delivery = session.scalar(select(Delivery).where(Delivery.recommendation_id == rec.id))
            if delivery is not None:
                attempts = session.scalars(
                    select(DeliveryAttempt)
                    .where(DeliveryAttempt.delivery_id == delivery.id)
                    .order_by(DeliveryAttempt.attempt)
                )
                deliveries = [
                    {
                        "attempt": a.attempt,
                        "at": a.attempted_at.strftime("%H:%M:%S"),
                        "status": a.status_code,
                        "error": a.error,
                        "ms": round(a.duration_ms, 1),
                    }
                    for a in attempts
                ]
        cards.append(
            EventCard(
                event_id=ev.event_id,
                status=ev.status,
                error=ev.error,
                query_uri=query.uri if query else None,
                query_frames=query_frames,
                results=results,
                deliveries=deliveries,
                note=(notes or {}).get(ev.event_id),
            )
        )
    env = Environment(loader=PackageLoader("app.ops", "templates"), autoescape=select_autoescape())
    env.filters["basename"] = lambda uri: html.unescape(str(uri).rsplit("/", 1)[-1])
    page = env.get_template("results.html").render(title=title, cards=cards)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    path.write_text(page)
    return path
