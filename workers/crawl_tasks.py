"""Thin task adapters for the crawl pipeline (app/crawl), and its beat entry.

Beat sends ``vidsim.crawl.pipeline`` every ``crawl_pipeline_interval_s``; that task only
composes the stages as a chain (no task waits on another):

    vidsim.crawl.run -> vidsim.crawl.preprocess -> vidsim.crawl.check_material
        -> (enough new clean videos) vidsim.train -> vidsim.backfill -> vidsim.rebuild_index

Each stage holds its own lock for the whole run (app.crawl.pipeline), so a stage never
overlaps a still-running run of itself, whether the second message comes from beat, a
redelivery or the CLI; a run that finds the lock taken returns at once. Only one beat is
effective with :data:`BEAT_CONF` (celery-redbeat: the scheduler holds a Redis lock that
it renews every tick; a second beat waits for it).

To wire into workers/app.py: merge :data:`CRAWL_BEAT_SCHEDULE` into ``beat_schedule`` and
:data:`BEAT_CONF` into ``app.conf`` (this module is in the app's ``include``).
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
# Stages stop themselves at crawl_run_max_s; the hard limit is the maintenance queue's.
_LIMIT = TIME_LIMITS["maintenance"]


def _beat_schedule() -> dict[str, dict[str, Any]]:
    every = get_settings().crawl_pipeline_interval_s
    return {
        "crawl-pipeline": {
            "task": "vidsim.crawl.pipeline",
            "schedule": every,
            # A message that waited a whole period is stale: the next one replaces it.
            "options": {"expires": every},
        },
    }


def _beat_conf() -> dict[str, Any]:
    settings = get_settings()
    if settings.embedded:
        return {}  # one machine, filesystem broker: Celery's own file-backed scheduler
    lock_timeout = settings.beat_lock_timeout_s
    return {
        "beat_scheduler": "redbeat.RedBeatScheduler",
        "redbeat_redis_url": settings.redis_url,
        "redbeat_key_prefix": f"{settings.broker_prefix}vidsim:redbeat",
        # The lock lapses lock_timeout after its holder dies; a standby beat polls for it
        # every max_loop_interval (RedBeat), and the holder renews it every tick.
        "redbeat_lock_timeout": lock_timeout,
        "beat_max_loop_interval": max(1, lock_timeout // 5),
    }


CRAWL_BEAT_SCHEDULE = _beat_schedule()
BEAT_CONF = _beat_conf()


@celery_app.task(name="vidsim.crawl.run", time_limit=_LIMIT)
def crawl_run(source_ids: list[int] | None = None, trigger: str = "task") -> dict[str, Any]:
    report = pipeline.run_crawl(settings=get_settings(), source_ids=source_ids, trigger=trigger)
    return {"skipped": report.skipped, "run_id": report.run_id, **report.counts}


@celery_app.task(name="vidsim.crawl.preprocess", time_limit=_LIMIT)
def crawl_preprocess(source_ids: list[int] | None = None, trigger: str = "task") -> dict[str, Any]:
    report = pipeline.run_preprocess(settings=get_settings(), source_ids=source_ids, trigger=trigger)
    return {"skipped": report.skipped, "run_id": report.run_id, **report.counts}


def _enqueue_training(task_id: str) -> None:
    steps = [
        celery_app.signature(TRAIN_TASK, immutable=True, options={"task_id": task_id}),
        celery_app.signature("vidsim.backfill", immutable=True),
        celery_app.signature("vidsim.rebuild_index", immutable=True),
    ]
    chain(*steps).apply_async()


@celery_app.task(name="vidsim.crawl.check_material", time_limit=TIME_LIMITS["maintenance"])
def crawl_check_material() -> int | None:
    """Records a training request when enough new clean videos arrived; starts training
    (then backfill and index rebuild) when a ``vidsim.train`` task is registered."""
    settings = get_settings()
    with session_scope() as session:
        n, _ = pipeline.new_material(session)
        if n < settings.crawl_train_min_new_items:
            return None
        enqueue = _enqueue_training if TRAIN_TASK in celery_app.tasks else None
        if enqueue is None:
            logger.warning("%d new clean videos, but no %s task is registered: request left pending", n, TRAIN_TASK)
        return pipeline.on_new_material(session, n, enqueue=enqueue).id


@celery_app.task(name="vidsim.crawl.pipeline", time_limit=TIME_LIMITS["maintenance"])
def crawl_pipeline() -> None:
    """Beat's entry point: the stages as one chain."""
    chain(crawl_run.si(trigger="beat"), crawl_preprocess.si(trigger="beat"), crawl_check_material.si()).apply_async()
