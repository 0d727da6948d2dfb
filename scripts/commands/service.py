"""`vidsim worker` and `vidsim beat`: start the service's Celery processes."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from app.config import get_settings
from workers.process import ALL_QUEUES, celery_command, serve, worker_commands


def worker(
    ctx: typer.Context,
    queues: Annotated[str, typer.Option(help="Comma-separated queues.")] = ALL_QUEUES,
    concurrency: Annotated[
        int | None, typer.Option(help="Worker processes (default: CPU count); threads for `--queues fetch` alone.")
    ] = None,
    pool: Annotated[str | None, typer.Option(help="prefork, solo or threads (GPU workers: solo).")] = None,
    beat: Annotated[bool, typer.Option(help="Also run the periodic scheduler (one per deployment).")] = False,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
) -> None:
    """Start a Celery worker (extra options go to `celery worker`). With the `fetch`
    queue among others, a second worker process serves it from a pool of threads."""
    import shutil
    import uuid

    from app.db import migrate

    _log_as_the_service_does()
    migrate()
    port = metrics_port or get_settings().metrics_port
    if port:
        # Prefork children write their metrics here; the main process serves the sum.
        folder = get_settings().data_dir.resolve() / "metrics" / uuid.uuid4().hex[:8]
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        os.environ.update(PROMETHEUS_MULTIPROC_DIR=str(folder), VIDSIM_METRICS_PORT=str(port))
    commands = worker_commands(
        queues, pool=pool, concurrency=concurrency, beat=beat, loglevel=get_settings().log_level, extra_args=ctx.args
    )
    if len(commands) == 1:
        os.execv(sys.executable, commands[0].args)
    raise typer.Exit(serve(commands))  # the fetch queue's thread pool beside the others


def beat() -> None:
    """Start the periodic scheduler (the outbox sweeper). Run exactly one."""
    _log_as_the_service_does()
    args = [*celery_command("beat"), "--loglevel", get_settings().log_level]
    os.execv(sys.executable, args)


def _log_as_the_service_does() -> None:
    # What this process logs before it becomes the worker (migrations) goes to the same
    # log, so in the same format.
    from app.logs import configure_logging

    configure_logging(get_settings().log_level, get_settings().log_format)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines name its plugins
