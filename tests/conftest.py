"""Test services: a fresh Postgres database per run, a private Redis database, and a
live Celery worker process. Nothing is mocked but the outside internet."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

PG_ADMIN = os.environ.get("VIDSIM_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("VIDSIM_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("VIDSIM_TEST_REDIS_DB", "11"))

_state: dict[str, str] = {}


def _pg_url(dbname: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{dbname}"


def create_database() -> str:
    name = f"vidsim_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pytest_configure(config: pytest.Config) -> None:
    """The environment every test and the worker share, set before app.config is read."""
    data_dir = Path(tempfile.mkdtemp(prefix="vidsim-test-"))
    dbname = create_database()
    _state.update(dbname=dbname, data_dir=str(data_dir))
    os.environ.update(
        DATABASE_URL=_pg_url(dbname),
        REDIS_URL=f"{REDIS_BASE}/{REDIS_DB}",
        VIDSIM_DATA_DIR=str(data_dir),
        VIDSIM_MEDIA_ROOTS=str(data_dir),
        VIDSIM_CALLBACK_ALLOW_PRIVATE="true",
        VIDSIM_OUTBOX_SWEEP_INTERVAL_S="0.5",
        VIDSIM_CALLBACK_RETRY_SCHEDULE="0,0.5,0.5,0.5",
        VIDSIM_CALLBACK_TIMEOUT_S="5",
        VIDSIM_TORCH_THREADS="1",
        # Test runs may share one Redis (CI and developers, several at once): own keys.
        VIDSIM_BROKER_PREFIX=f"{dbname}:",
    )
    from app.config import get_settings

    get_settings.cache_clear()
    from app.db import migrate

    migrate()


def pytest_unconfigure(config: pytest.Config) -> None:
    if "dbname" in _state:
        from app.db import get_engine

        get_engine().dispose()
        drop_database(_state["dbname"])
        client = redis.Redis.from_url(os.environ["REDIS_URL"])
        for key in client.scan_iter(match=f"{_state['dbname']}:*"):
            client.delete(key)
        client.close()


@pytest.fixture(scope="session")
def settings():  # type: ignore[no-untyped-def]
    from app.config import get_settings

    return get_settings()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return Path(_state["data_dir"])


@pytest.fixture
def session():  # type: ignore[no-untyped-def]
    """A session whose work is committed at the end of the test (like a task's)."""
    from app.db import session_scope

    with session_scope() as s:
        yield s


@contextlib.contextmanager
def start_worker(log_path: Path, *, queues: str = "events,embed,callbacks,maintenance", beat: bool = True,
                 pool: str = "solo", extra_env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:  # fmt: skip
    """A real `celery worker` process; yields once it is consuming."""
    args = [sys.executable, "-m", "celery", "-A", "workers.app:celery_app", "worker", "--pool", pool,
            "-Q", queues, "--loglevel", "INFO", "--without-mingle", "--without-gossip",
            "-n", f"test-{uuid.uuid4().hex[:6]}@%h"]  # fmt: skip
    if beat:
        args.append("--beat")
    log = open(log_path, "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(extra_env or {})},
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"ready." not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def worker(data_dir: Path) -> Iterator[subprocess.Popen]:
    """One live worker (with beat: the outbox sweeper) for the tests that need one."""
    with start_worker(data_dir / "worker.log") as proc:
        yield proc


@pytest.fixture
def receiver(settings):  # type: ignore[no-untyped-def]
    from app.receiver import CallbackReceiver

    with CallbackReceiver(settings.webhook_secrets[0]) as rx:
        yield rx
