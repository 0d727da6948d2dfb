"""Serving Prometheus metrics from a worker: task timings from Celery's signals, and at
scrape time the queue depths, active model and index from Redis and Postgres.

Prefork children write to ``PROMETHEUS_MULTIPROC_DIR`` (``vidsim worker`` sets it); the
main process serves their sum on ``VIDSIM_METRICS_PORT``."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from celery.signals import task_failure, task_postrun, task_prerun, worker_init
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.config import get_settings
from app.metrics import TASK_DURATION, TASK_FAILURES
from workers.app import QUEUES, celery_app

logger = logging.getLogger(__name__)
_started: dict[str, float] = {}


@task_prerun.connect
def _task_started(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _started[task_id] = time.perf_counter()


@task_postrun.connect
def _task_finished(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    began = _started.pop(task_id or "", None)
    if began is not None and task is not None:
        TASK_DURATION.labels(task.name).observe(time.perf_counter() - began)


@task_failure.connect
def _task_failed(sender: Any = None, **_: Any) -> None:
    TASK_FAILURES.labels(getattr(sender, "name", "unknown")).inc()


def queue_depths() -> dict[str, int]:
    """Messages waiting per queue (Redis lists; the filesystem broker's files)."""
    settings = get_settings()
    if settings.embedded:
        folder = settings.data_dir / "broker"
        counts = dict.fromkeys(QUEUES, 0)
        for path in folder.glob("*.msg"):
            for queue in QUEUES:
                if f"_{queue}." in path.name:
                    counts[queue] += 1
        return counts
    with celery_app.connection_for_read() as conn:
        client = conn.default_channel.client
        # kombu's client adds VIDSIM_BROKER_PREFIX to the key itself.
        return {queue: int(client.llen(queue)) for queue in QUEUES}


class StateCollector(Collector):
    """Read at scrape time, so every worker reports the same truth."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy import select

        from app.db import session_scope
        from app.models import IndexVersion, ModelVersion

        depth = GaugeMetricFamily("vidsim_queue_depth", "Messages waiting per queue.", labels=["queue"])
        try:
            for queue, n in queue_depths().items():
                depth.add_metric([queue], n)
        except Exception as exc:  # the broker being down must not break the scrape
            logger.warning("queue depth unavailable: %s", exc)
        yield depth
        model = GaugeMetricFamily("vidsim_model_version", "Active model version id.")
        index = GaugeMetricFamily("vidsim_index_version", "Active index version id.")
        size = GaugeMetricFamily("vidsim_index_size", "Vectors in the active index.")
        with session_scope() as session:
            active_model = session.scalar(select(ModelVersion).where(ModelVersion.is_active))
            active_index = session.scalar(select(IndexVersion).where(IndexVersion.is_active))
            if active_model is not None:
                model.add_metric([], active_model.id)
            if active_index is not None:
                index.add_metric([], active_index.id)
                size.add_metric([], active_index.size)
        yield from (model, index, size)


def registry() -> CollectorRegistry:
    """The worker processes' metrics (summed across prefork children) plus the state."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
    else:
        from prometheus_client import REGISTRY as reg
    reg.register(StateCollector())
    return reg


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    port = get_settings().metrics_port
    if port:
        # all interfaces: Prometheus scrapes it from outside the container
        start_http_server(port, addr="0.0.0.0", registry=registry())
        logger.info("metrics on :%d/metrics", port)
