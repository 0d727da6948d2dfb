"""Test services: a fresh Postgres database per run, a private Redis database, and a
live Celery worker process. Nothing is mocked but the outside internet."""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from support.net import refuse_egress

from workers.process import running_worker

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
        # Short, so that tests/test_slow_sources.py sees a dripping download cut off soon.
        VIDSIM_DOWNLOAD_DEADLINE_S="12",
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


@pytest.fixture(autouse=True)
def _no_egress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests talk to this machine only: a connection from the test process to an address
    outside the loopback range is refused (a faked public name is vetted, never dialled)."""
    refuse_egress(monkeypatch)


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


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Route app.media.video's temporary directories here, to check that they are removed."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


# A real `celery worker` process; yields once it is consuming (shared with the demo).
start_worker = running_worker


@pytest.fixture(scope="session")
def worker(data_dir: Path) -> Iterator[subprocess.Popen]:
    """One live worker (with beat: the outbox sweeper) for the tests that need one."""
    with start_worker(data_dir / "worker.log") as proc:
        yield proc


@pytest.fixture
def receiver(settings):  # type: ignore[no-untyped-def]
    from scripts.receiver import CallbackReceiver

    with CallbackReceiver(settings.webhook_secrets[0]) as rx:
        yield rx


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the videos one test module makes."""
    return tmp_path_factory.mktemp("media")
