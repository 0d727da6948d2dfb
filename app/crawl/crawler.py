"""The crawl stage: discover each source's videos, then fetch and vet them one at a time.

Each item ends in one state: ``fetched`` (a checked video, stored once under its content
hash), ``duplicate`` (same content or URL as an item already stored), ``rejected`` with a
code and a reason, or still ``discovered`` (a transient failure or the run's budget; tried
again by a later run, at most ``crawl_item_max_attempts`` times).

A file is accepted when its magic bytes say video (already checked while streaming) and
:func:`app.media.video.probe`, in a sandboxed child, finds a video stream within the duration,
resolution, stream-count and size limits. It is written under a temporary name and moved
into ``crawl_dir/raw/<sha256>.<ext>`` only then.

Works through ``sessions`` (a unit-of-work factory such as :func:`app.db.session_scope`):
every item is committed on its own, so a long run keeps what it did if it dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.crawl import discover as disc
from app.crawl import platform
from app.crawl.models import DISCOVERED, DUPLICATE, FETCHED, HOLDS_CONTENT, REJECTED, CrawledItem, CrawlSource
from app.crawl.net import Downloaded, Fetcher, FetchError
from app.db import Sessions
from app.media import video as video_io
from app.media.video import decode_limits
from app.models import utcnow

logger = logging.getLogger(__name__)

# progress(stage, done, total, note): total None while unknown.
Progress = Callable[[str, int, int | None, str], None]


def _no_progress(stage: str, done: int, total: int | None, note: str) -> None:
    pass


@dataclass
class CrawlCounts:
    """What a crawl run did, for its run row and the operator."""

    found: int = 0  # candidate URLs seen on the sources
    new: int = 0  # of which not known before
    fetched: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # by reject code
    deferred: Counter[str] = field(default_factory=Counter)  # transient: left for a later run
    discovery_errors: Counter[str] = field(default_factory=Counter)
    pages: int = 0
    bytes: int = 0
    requests: int = 0
    stopped: str | None = None  # why the run stopped early (budget)

    def as_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "new": self.new,
            "fetched": self.fetched,
            "duplicates": self.duplicates,
            "rejected": dict(self.rejected),
            "deferred": dict(self.deferred),
            "discovery_errors": dict(self.discovery_errors),
            "pages": self.pages,
            "bytes": self.bytes,
            "requests": self.requests,
            "stopped": self.stopped,
        }


# --------------------------------------------------------------------------- data functions


def record_candidates(session: Session, source_id: int, candidates: list[disc.Candidate], *, run_id: int | None) -> int:
    """Inserts unknown candidates as 'discovered' items; returns how many were new."""
    if not candidates:
        return 0
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    new = 0
    for start in range(0, len(candidates), 500):
        rows: list[dict[str, Any]] = [
            {"source_id": source_id, "url": c.url, "page_url": c.page_url, "via": c.via, "run_id": run_id,
             "state": DISCOVERED, "attempts": 0, "trimmed": {}, "discovered_at": utcnow()}
            for c in candidates[start : start + 500]
        ]  # fmt: skip
        stmt = insert(CrawledItem).values(rows).on_conflict_do_nothing(index_elements=["source_id", "url"])
        new += len(session.execute(stmt.returning(CrawledItem.id)).all())
    return new


def reject(item: CrawledItem, code: str, reason: str) -> None:
    item.state, item.reject_code, item.reason = REJECTED, code, reason[:1000]


def accept(session: Session, item: CrawledItem, download: Downloaded, *, settings: Settings) -> str:
    """Vets a downloaded file and files it: returns the item's new state. Removes the
    temporary file whatever happens."""
    try:
        item.content_hash, item.size_bytes = download.sha256, download.size
        holder = session.scalar(
            select(CrawledItem.id).where(
                CrawledItem.content_hash == download.sha256,
                CrawledItem.state.in_(HOLDS_CONTENT),
                CrawledItem.id != item.id,
            )
        )
        if holder is not None:
            item.state, item.duplicate_of_id = DUPLICATE, holder
            return DUPLICATE
        limits = dataclasses.replace(
            decode_limits(settings),
            max_bytes=settings.crawl_max_download_bytes,
            max_seconds=min(settings.max_video_seconds, settings.crawl_max_video_seconds),
        )
        try:
            info = video_io.probe(download.path, limits=limits)
        except video_io.VideoError as exc:
            code = "not_video" if exc.reason.startswith("not a video") else "probe"
            reject(item, code, exc.reason)
            return REJECTED
        if info.duration_s < settings.crawl_min_clean_seconds:
            reject(item, "too_short", f"{info.duration_s:.1f} s long (minimum {settings.crawl_min_clean_seconds:g} s)")
            return REJECTED
        raw_dir = settings.crawl_dir / "raw"
        raw_dir.mkdir(parents=True, exist_ok=True)
        final = raw_dir / f"{download.sha256}.{download.kind}"
        os.replace(download.path, final)  # atomic: a file under raw/ is always whole
        item.state, item.local_path = FETCHED, str(final)
        item.duration_s, item.width, item.height = info.duration_s, info.width, info.height
        item.fetched_at = utcnow()
        try:
            with session.begin_nested():  # another worker may have stored the same bytes
                session.flush()
        except IntegrityError:
            holder = session.scalar(
                select(CrawledItem.id).where(
                    CrawledItem.content_hash == download.sha256, CrawledItem.state.in_(HOLDS_CONTENT)
                )
            )
            item.state, item.duplicate_of_id, item.local_path = DUPLICATE, holder, None
            return DUPLICATE
        return FETCHED
    finally:
        with contextlib.suppress(FileNotFoundError):
            download.path.unlink()


# --------------------------------------------------------------------------- the stage


def crawl(
    *,
    sessions: Sessions,
    settings: Settings,
    fetcher: Fetcher,
    source_ids: list[int] | None = None,
    run_id: int | None = None,
    progress: Progress = _no_progress,
) -> CrawlCounts:
    """Discovers and fetches every enabled source (or ``source_ids``) within the fetcher's
    budget. Callers hold the crawl lock (app.crawl.pipeline.run_crawl does)."""
    counts = CrawlCounts()
    with sessions() as session:
        stmt = select(CrawlSource.id).where(CrawlSource.enabled).order_by(CrawlSource.id)
        if source_ids:
            stmt = select(CrawlSource.id).where(CrawlSource.id.in_(source_ids)).order_by(CrawlSource.id)
        ids = list(session.scalars(stmt))
    for n, source_id in enumerate(ids):
        why = fetcher.budget.exhausted()
        if why:
            counts.stopped = why
            break
        progress("discover", n, len(ids), f"source {source_id}")
        _discover_source(source_id, sessions=sessions, fetcher=fetcher, run_id=run_id, counts=counts)
        _fetch_source(
            source_id,
            sessions=sessions,
            settings=settings,
            fetcher=fetcher,
            run_id=run_id,
            counts=counts,
            progress=progress,
        )
    progress("discover", len(ids), len(ids), "done")
    counts.pages, counts.bytes, counts.requests = fetcher.budget.pages, fetcher.budget.bytes, fetcher.requests
    logger.info("crawl: %s", counts.as_dict())
    return counts


def _discover_source(
    source_id: int, *, sessions: Sessions, fetcher: Fetcher, run_id: int | None, counts: CrawlCounts
) -> None:
    with sessions() as session:
        source = session.get_one(CrawlSource, source_id)
        kind, url, options = source.kind, source.url, dict(source.options or {})
    if kind == "platform":
        found = platform.discover_platform(fetcher, url=url, options=options)
    else:
        found = disc.discover(fetcher, kind=kind, url=url, options=options)
    counts.found += len(found.candidates)
    counts.discovery_errors.update(found.errors)
    with sessions() as session:
        counts.new += record_candidates(session, source_id, found.candidates, run_id=run_id)
        session.execute(update(CrawlSource).where(CrawlSource.id == source_id).values(last_crawled_at=utcnow()))
    logger.info(
        "source %d (%s): %d candidates, %d pages, errors %s",
        source_id,
        kind,
        len(found.candidates),
        found.pages,
        found.errors,
    )


def _fetch_source(
    source_id: int,
    *,
    sessions: Sessions,
    settings: Settings,
    fetcher: Fetcher,
    run_id: int | None,
    counts: CrawlCounts,
    progress: Progress,
) -> None:
    with sessions() as session:
        options = dict(session.get_one(CrawlSource, source_id).options or {})
        stmt = (
            select(CrawledItem.id)
            .where(CrawledItem.source_id == source_id, CrawledItem.state == DISCOVERED)
            .order_by(CrawledItem.id)
        )
        if options.get("max_items"):
            stmt = stmt.limit(int(options["max_items"]))
        item_ids = list(session.scalars(stmt))
    tmp_dir = settings.crawl_dir / "tmp"
    for n, item_id in enumerate(item_ids):
        why = fetcher.budget.exhausted(item=True)
        if why:
            counts.stopped = why
            return
        progress("fetch", n, len(item_ids), f"source {source_id}")
        with sessions() as session:
            item = session.get_one(CrawledItem, item_id)
            url, via = item.url, item.via
            # The same URL already stored from another source: no need to fetch it again.
            holder = session.scalar(
                select(CrawledItem.id).where(CrawledItem.url == url, CrawledItem.state.in_(HOLDS_CONTENT)).limit(1)
            )
            if holder is not None:
                item.state, item.duplicate_of_id, item.run_id = DUPLICATE, holder, run_id
                counts.duplicates += 1
                continue
        try:
            if via == "ytdlp":
                if not fetcher.allowed(url):
                    blocked = fetcher.robots(url).blocked
                    raise (
                        FetchError("blocked", blocked) if blocked else FetchError("robots", "disallowed by robots.txt")
                    )
                download = platform.download_platform(
                    url, settings=settings, options=options, tmp_dir=tmp_dir, budget=fetcher.budget
                )
            else:
                download = fetcher.download(url, tmp_dir=tmp_dir)
        except FetchError as exc:
            _record_failure(item_id, exc, sessions=sessions, settings=settings, run_id=run_id, counts=counts)
            if exc.code == "budget":
                counts.stopped = exc.reason
                return
            continue
        with sessions() as session:
            item = session.get_one(CrawledItem, item_id)
            item.run_id, item.attempts = run_id, item.attempts + 1
            state = accept(session, item, download, settings=settings)
            code = item.reject_code
        if state == FETCHED:
            counts.fetched += 1
        elif state == DUPLICATE:
            counts.duplicates += 1
        else:
            counts.rejected[code or "rejected"] += 1
        logger.info("item %d %s: %s", item_id, url, state if state != REJECTED else f"rejected ({code})")
    progress("fetch", len(item_ids), len(item_ids), f"source {source_id} done")


def _record_failure(
    item_id: int, exc: FetchError, *, sessions: Sessions, settings: Settings, run_id: int | None, counts: CrawlCounts
) -> None:
    with sessions() as session:
        item = session.get_one(CrawledItem, item_id)
        item.run_id = run_id
        if exc.code == "budget":  # not the item's fault: no attempt counted
            counts.deferred[exc.code] += 1
            return
        item.attempts += 1
        if exc.transient and item.attempts < settings.crawl_item_max_attempts:
            item.reason = f"{exc.code}: {exc.reason}"[:1000]
            counts.deferred[exc.code] += 1
        else:
            reject(item, exc.code, exc.reason)
            counts.rejected[exc.code] += 1
    logger.info("item %d: %s (%s)", item_id, exc.reason, exc.code)


def state_counts(session: Session, *, source_id: int | None = None) -> dict[str, Any]:
    """Items by state, and rejections by code (for `vidsim crawl status`)."""
    stmt = select(CrawledItem.state, CrawledItem.reject_code, func.count()).group_by(
        CrawledItem.state, CrawledItem.reject_code
    )
    if source_id is not None:
        stmt = stmt.where(CrawledItem.source_id == source_id)
    states: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    for state, code, n in session.execute(stmt):
        states[state] += n
        if state == REJECTED:
            rejected[code or "?"] += n
    return {"states": dict(states), "rejected": dict(rejected)}


def raw_dir(settings: Settings) -> Path:
    return settings.crawl_dir / "raw"
