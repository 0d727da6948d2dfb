"""Thin task adapters for the crawl pipeline (app/crawl), and its beat entry.

Beat sends ``vidsim.crawl.pipeline`` every ``crawl_pipeline_interval_s``; that task only
composes the stages as a chain (no task waits on another):

    vidsim.crawl.run -> vidsim.crawl.preprocess -> vidsim.crawl.check_material
        -> (enough new clean videos) vidsim.train(activate=True)
        -> the new model's rollout: backfill (embed the library) -> index build -> switch

Each stage holds its own lock for the whole run (app.crawl.pipeline), so a stage never
overlaps a still-running run of itself, whether the second message comes from beat, a
redelivery or the CLI; a run that finds the lock taken returns at once. Only one beat is
effective (celery-redbeat, configured in workers/app.py: the scheduler holds a Redis lock
that it renews every tick; a second beat waits for it).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import chain

from app.config import get_settings
from app.crawl import pipeline
from app.db import session_scope
from workers.app import TIME_LIMITS, celery_app

logger = logging.getLogger(__name__)

TRAIN_TASK = "vidsim.train"
# Stages stop themselves at crawl_run_max_s; the hard limit is the crawl queue's.
_LIMIT = TIME_LIMITS["crawl"]


@celery_app.task(name="vidsim.crawl.run", time_limit=_LIMIT)
def crawl_run(source_ids: list[int] | None = None, trigger: str = "task") -> dict[str, Any]:
    report = pipeline.run_crawl(settings=get_settings(), source_ids=source_ids, trigger=trigger)
    return {"skipped": report.skipped, "run_id": report.run_id, **report.counts}


@celery_app.task(name="vidsim.crawl.preprocess", time_limit=_LIMIT)
def crawl_preprocess(source_ids: list[int] | None = None, trigger: str = "task") -> dict[str, Any]:
    report = pipeline.run_preprocess(settings=get_settings(), source_ids=source_ids, trigger=trigger)
    return {"skipped": report.skipped, "run_id": report.run_id, **report.counts}


def _enqueue_training(task_id: str) -> None:
    # activate=True: the new model's rollout embeds the library with it (backfill), builds
    # its index, then switches serving to both (vidsim.activate_model, advance_rollouts).
    celery_app.send_task(TRAIN_TASK, kwargs={"activate": True}, task_id=task_id)


@celery_app.task(name="vidsim.crawl.check_material", time_limit=_LIMIT)
def crawl_check_material() -> int | None:
    """Records a training request when enough new clean videos arrived; starts training
    (whose rollout backfills and rebuilds the index) when ``vidsim.train`` is registered."""
    settings = get_settings()
    with session_scope() as session:
        n, _ = pipeline.new_material(session)
        if n < settings.crawl_train_min_new_items:
            return None
        celery_app.loader.import_default_modules()  # the app's include (a worker has them already)
        enqueue = _enqueue_training if TRAIN_TASK in celery_app.tasks else None
        if enqueue is None:
            logger.warning("%d new clean videos, but no %s task is registered: request left pending", n, TRAIN_TASK)
        return pipeline.on_new_material(session, n, enqueue=enqueue).id


@celery_app.task(name="vidsim.crawl.pipeline", time_limit=_LIMIT)
def crawl_pipeline() -> None:
    """Beat's entry point: the stages as one chain."""
    chain(crawl_run.si(trigger="beat"), crawl_preprocess.si(trigger="beat"), crawl_check_material.si()).apply_async()
