"""The rows behind the operator's list commands (`vidsim library list`, `model list`,
`deliveries list`, `crawl list` / `status` / `items`) and the one direct write
(`library disable`). The caller owns the transaction: nothing here commits."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.crawl.models import CrawledItem, CrawlRun, TrainingRequest
from app.models import Delivery, ModelVersion, Recommendation, Video


def recent_videos(*, session: Session, limit: int) -> list[Video]:
    """The most recently registered videos, newest first."""
    return list(session.scalars(select(Video).order_by(Video.id.desc()).limit(limit)))


def disable_video(*, session: Session, video_id: int) -> Video | None:
    """Stops recommending a video (it stays recorded); None for an unknown id."""
    video = session.get(Video, video_id)
    if video is not None:
        video.enabled = False
        session.flush()
    return video


def model_versions(*, session: Session) -> list[ModelVersion]:
    """Every model version, oldest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))


def recent_deliveries(*, session: Session, status: str | None, limit: int) -> list[tuple[Delivery, str]]:
    """The latest callback deliveries (of one status, if given), newest first, each with its event id."""
    stmt = select(Delivery, Recommendation.event_id).join(Recommendation).order_by(Delivery.id.desc()).limit(limit)
    if status:
        stmt = stmt.where(Delivery.status == status)
    return [(delivery, event_id) for delivery, event_id in session.execute(stmt).all()]


def crawl_item_states(*, session: Session) -> dict[int, dict[str, int]]:
    """Crawled items counted by state, per source id."""
    per_state: dict[int, dict[str, int]] = {}
    stmt = select(CrawledItem.source_id, CrawledItem.state, func.count()).group_by(
        CrawledItem.source_id, CrawledItem.state
    )
    for source_id, state, n in session.execute(stmt):
        per_state.setdefault(source_id, {})[state] = n
    return per_state


def recent_crawl_runs(*, session: Session, limit: int) -> list[CrawlRun]:
    """The latest runs of every crawl stage, newest first."""
    return list(session.scalars(select(CrawlRun).order_by(CrawlRun.id.desc()).limit(limit)))


def recent_training_requests(*, session: Session, limit: int) -> list[TrainingRequest]:
    """The latest requests for training on new crawled material, newest first."""
    return list(session.scalars(select(TrainingRequest).order_by(TrainingRequest.id.desc()).limit(limit)))


def crawled_items(
    *, session: Session, state: str | None, source_ids: list[int] | None, limit: int
) -> list[CrawledItem]:
    """Crawled items, newest first, optionally of one state and of some sources."""
    stmt = select(CrawledItem).order_by(CrawledItem.id.desc()).limit(limit)
    if state:
        stmt = stmt.where(CrawledItem.state == state)
    if source_ids:
        stmt = stmt.where(CrawledItem.source_id.in_(source_ids))
    return list(session.scalars(stmt))
