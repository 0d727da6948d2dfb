"""Running a Celery worker as a child process (the demo, benchmarks and tests do)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from app.config import get_settings

ALL_QUEUES = "events,embed,callbacks,maintenance,crawl"


def celery_command(command: str) -> list[str]:
    """`celery` on vidsim's app with this interpreter, running ``command`` ("worker",
    "beat"; add its options). With JSON logs it runs quiet: Celery's start-up banner is
    text, not log records, and log shippers read every line as one (workers.app logs
    what the banner says)."""
    quiet = ["--quiet"] if get_settings().log_format == "json" else []
    return [sys.executable, "-m", "celery", "-A", "workers.app:celery_app", *quiet, command]


@contextlib.contextmanager
def running_worker(
    log_path: Path,
    *,
    queues: str = ALL_QUEUES,
    pool: str = "solo",
    concurrency: int | None = None,
    beat: bool = True,
    extra_env: dict[str, str] | None = None,
    ready_timeout_s: float = 90.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``celery worker`` process (with the beat scheduler unless ``beat=False``);
    yields once it consumes, stops it (SIGTERM, then SIGKILL) on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = [*celery_command("worker"), "--pool", pool,
            "-Q", queues, "--loglevel", "INFO", "--without-mingle", "--without-gossip",
            "-n", f"vidsim-{uuid.uuid4().hex[:6]}@%h"]  # fmt: skip
    if concurrency:
        args += ["--concurrency", str(concurrency)]
    if beat:
        args.append("--beat")
    with open(log_path, "ab") as log:
        start = log.tell()
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(extra_env or {})}, start_new_session=True
        )
        try:
            deadline = time.monotonic() + ready_timeout_s
            while b" ready." not in log_path.read_bytes()[start:]:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
