"""The Celery worker processes that serve a set of queues: what `vidsim worker` runs, and
what the demo, benchmarks and tests run as child processes.

The `fetch` queue gets a worker process of its own with a pool of threads. A download
waits on another host, not on a CPU: in the pool that serves events, a few servers
trickling their answers occupied every process (prefetch 1, late acks), and no event
was served until their downloads ended. In threads, each holds one thread for at most
``VIDSIM_DOWNLOAD_DEADLINE_S``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.config import get_settings

ALL_QUEUES = "events,fetch,embed,callbacks,maintenance,crawl"
FETCH_QUEUE = "fetch"
# Downloads at once per fetch worker (each a thread; `--concurrency` when `fetch` is a
# worker's only queue).
FETCH_THREADS = 8


def celery_command(command: str) -> list[str]:
    """`celery` on vidsim's app with this interpreter, running ``command`` ("worker",
    "beat"; add its options). With JSON logs it runs quiet: Celery's start-up banner is
    text, not log records, and log shippers read every line as one (workers.app logs
    what the banner says)."""
    quiet = ["--quiet"] if get_settings().log_format == "json" else []
    return [sys.executable, "-m", "celery", "-A", "workers.app:celery_app", *quiet, command]


@dataclass(frozen=True)
class WorkerCommand:
    """One ``celery worker`` command line. Only the first of a set serves metrics: the
    others write theirs to the same PROMETHEUS_MULTIPROC_DIR, and it serves the sum."""

    args: list[str]
    serves_metrics: bool

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        return dict(base) if self.serves_metrics else {k: v for k, v in base.items() if k != "VIDSIM_METRICS_PORT"}


def worker_commands(
    queues: str = ALL_QUEUES,
    *,
    pool: str | None = None,
    concurrency: int | None = None,
    beat: bool = False,
    loglevel: str = "INFO",
    name: str = "celery",
    extra_args: Sequence[str] = (),
) -> list[WorkerCommand]:
    """The workers that serve ``queues``: one for all but `fetch` (``pool``,
    ``concurrency`` and beat are its), named ``name@host``, and one in threads for
    `fetch`, ``name-fetch@host``. Each gets ``extra_args``."""
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    others = [q for q in wanted if q != FETCH_QUEUE]
    commands = []
    if others:
        args = [*celery_command("worker"), "-Q", ",".join(others), "--loglevel", loglevel, "-n", f"{name}@%h"]
        args += ["--pool", pool] if pool else []
        args += ["--concurrency", str(concurrency)] if concurrency else []
        args += ["--beat"] if beat else []
        commands.append(WorkerCommand([*args, *extra_args], serves_metrics=True))
    if FETCH_QUEUE in wanted:
        threads = concurrency if concurrency and not others else FETCH_THREADS
        args = [*celery_command("worker"), "-Q", FETCH_QUEUE, "--loglevel", loglevel, "-n", f"{name}-fetch@%h",
                "--pool", "threads", "--concurrency", str(threads)]  # fmt: skip
        if not others:
            args += ["--beat"] if beat else []
        commands.append(WorkerCommand([*args, *extra_args], serves_metrics=not others))
    if not commands:
        raise ValueError(f"no queue named in {queues!r}")
    return commands


def serve(commands: list[WorkerCommand]) -> int:
    """Runs the workers until one of them exits (then stops the others) or this process
    is told to stop (SIGTERM, SIGINT: passed on to each, which finish their tasks), and
    returns the exit status: what `vidsim worker` does with more than one."""
    # Sessions of their own: a terminal's Ctrl-C reaches them once, passed on from here.
    procs = [subprocess.Popen(c.args, env=c.env(os.environ), start_new_session=True) for c in commands]
    told: list[int] = []

    def pass_on(signum: int, _frame: object) -> None:
        told.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, pass_on)
    while all(proc.poll() is None for proc in procs):
        time.sleep(0.5)
    if not told:  # one ended by itself: stop the others, and the deployment restarts the whole
        pass_on(signal.SIGTERM, None)
    codes = [proc.wait() for proc in procs]
    return next((code for code in codes if code), 0)


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
    """Real ``celery worker`` processes for ``queues`` (with the beat scheduler unless
    ``beat=False``), as `vidsim worker` runs them, logging to ``log_path``; yields the
    first once all consume, stops them (SIGTERM, then SIGKILL) on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    name = f"vidsim-{uuid.uuid4().hex[:6]}"
    commands = worker_commands(queues, pool=pool, concurrency=concurrency, beat=beat, name=name,
                               extra_args=("--without-mingle", "--without-gossip"))  # fmt: skip
    env = {**os.environ, **(extra_env or {})}
    procs: list[subprocess.Popen[bytes]] = []
    with open(log_path, "ab") as log:
        start = log.tell()
        try:
            for command in commands:
                procs.append(subprocess.Popen(command.args, stdout=log, stderr=subprocess.STDOUT,
                                              env=command.env(env), start_new_session=True))  # fmt: skip
            deadline = time.monotonic() + ready_timeout_s
            while log_path.read_bytes()[start:].count(b" ready.") < len(procs):
                if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            yield procs[0]
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
