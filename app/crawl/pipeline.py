"""The crawl pipeline's stages, each runnable from a Celery task or the CLI:

    crawl -> preprocess -> (enough new material) train -> backfill -> index rebuild

A stage never overlaps a still-running run of itself, whoever started it (beat, a
retried task message, an operator): it holds a lock for the whole run
(:func:`app.db.named_lock`: a Postgres advisory lock that a killed worker cannot leave
held, or an flock when embedded on SQLite). A run that finds the lock taken returns at
once with ``skipped``.

Each run is recorded in ``crawl_runs`` with its counts. Training itself belongs to
``vidsim.train``: :func:`on_new_material` records the need and, given an ``enqueue``
callable (the worker passes one when that task exists), starts it after the commit.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.crawl.crawler import CrawlCounts, Progress, Sessions, _no_progress, crawl
from app.crawl.models import PREPROCESSED, CrawledItem, CrawlRun, TrainingRequest
from app.crawl.net import Budget, Fetcher
from app.crawl.trim import preprocess, training_files
from app.db import named_lock, session_scope
from app.models import utcnow

__all__ = [
    "StageReport",
    "new_material",
    "on_new_material",
    "run_crawl",
    "run_preprocess",
    "training_files",
]

logger = logging.getLogger(__name__)


@dataclass
class StageReport:
    stage: str
    skipped: bool = False  # another run of the stage holds the lock
    run_id: int | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@contextlib.contextmanager
def _stage_run(stage: str, *, settings: Settings, sessions: Sessions, trigger: str) -> Iterator[StageReport]:
    """Holds the stage's lock and records the run; report.skipped when the lock is taken."""
    report = StageReport(stage)
    started = time.monotonic()
    with named_lock(f"crawl-stage:{stage}", settings=settings) as got:
        if not got:
            report.skipped = True
            logger.info("%s: another run is in progress; not starting", stage)
            yield report
            return
        with sessions() as session:
            # Holding the lock, any run still marked running has died.
            session.execute(
                update(CrawlRun)
                .where(CrawlRun.stage == stage, CrawlRun.status == "running")
                .values(status="abandoned", finished_at=utcnow())
            )
            run = CrawlRun(stage=stage, trigger=trigger, status="running", counts={})
            session.add(run)
            session.flush()
            report.run_id = run.id
        try:
            yield report
        except BaseException as exc:
            with sessions() as session:
                row = session.get_one(CrawlRun, report.run_id)
                row.status, row.error, row.finished_at = "failed", f"{type(exc).__name__}: {exc}"[:1000], utcnow()
                row.counts = report.counts
            raise
        report.seconds = time.monotonic() - started
        with sessions() as session:
            row = session.get_one(CrawlRun, report.run_id)
            row.status, row.finished_at = "done", utcnow()
            row.counts = {**report.counts, "seconds": round(report.seconds, 2)}


# --------------------------------------------------------------------------- stages


def run_crawl(
    *,
    settings: Settings | None = None,
    source_ids: list[int] | None = None,
    max_pages: int | None = None,
    max_items: int | None = None,
    max_bytes: int | None = None,
    progress: Progress = _no_progress,
    trigger: str = "cli",
    sessions: Sessions = session_scope,
) -> StageReport:
    """One crawl run over the enabled sources (or ``source_ids``), within the run budget
    (settings, or the overrides given)."""
    settings = settings or get_settings()
    with _stage_run("crawl", settings=settings, sessions=sessions, trigger=trigger) as report:
        if report.skipped:
            return report
        budget = Budget.from_settings(settings, max_pages=max_pages, max_items=max_items, max_bytes=max_bytes)
        counts = CrawlCounts()
        with Fetcher(settings=settings, budget=budget) as fetcher:
            try:
                counts = crawl(
                    sessions=sessions, settings=settings, fetcher=fetcher, source_ids=source_ids,
                    run_id=report.run_id, progress=progress,
                )  # fmt: skip
            finally:
                report.counts = counts.as_dict() | budget.as_dict()
    return report


def run_preprocess(
    *,
    settings: Settings | None = None,
    source_ids: list[int] | None = None,
    progress: Progress = _no_progress,
    trigger: str = "cli",
    sessions: Sessions = session_scope,
) -> StageReport:
    """Trims every fetched item into a clean file (see app.crawl.trim)."""
    settings = settings or get_settings()
    with _stage_run("preprocess", settings=settings, sessions=sessions, trigger=trigger) as report:
        if report.skipped:
            return report
        counts = preprocess(sessions=sessions, settings=settings, source_ids=source_ids, progress=progress)
        report.counts = counts.as_dict()
    return report


# --------------------------------------------------------------------------- training hook


def new_material(session: Session) -> tuple[int, int]:
    """(clean items not yet counted by a training request, the highest such item id)."""
    watermark = session.scalar(select(func.coalesce(func.max(TrainingRequest.item_watermark), 0))) or 0
    n, top = session.execute(
        select(func.count(), func.coalesce(func.max(CrawledItem.id), 0)).where(
            CrawledItem.state == PREPROCESSED, CrawledItem.id > watermark
        )
    ).one()
    return int(n), int(top or watermark)


def on_new_material(session: Session, n: int, *, enqueue: Callable[[str], None] | None = None) -> TrainingRequest:
    """Records that ``n`` new clean videos are ready to train on.

    With ``enqueue`` (called with a fresh task id once ``session`` commits, so the task
    finds the row), the request is marked 'enqueued' under that id; without, it stays
    'pending' for an operator or a later trainer to pick up. Never commits.
    """
    _, top = new_material(session)
    request = TrainingRequest(new_items=n, item_watermark=top, status="pending")
    if enqueue is not None:
        task_id = str(uuid.uuid4())
        request.status, request.task_id = "enqueued", task_id

        def _after_commit(_session: Session) -> None:
            try:
                enqueue(task_id)
            except Exception:
                logger.exception("could not enqueue training task %s", task_id)

        event.listen(session, "after_commit", _after_commit, once=True)
    session.add(request)
    session.flush()
    logger.info("training request %d: %d new clean videos (%s)", request.id, n, request.status)
    return request
