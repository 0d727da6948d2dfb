"""Engine and sessions. Engines are made per process (never shared across fork)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings


@functools.cache
def _engine_for(url: str, pid: int) -> Engine:
    # pid is part of the key: a forked Celery child gets its own pool.
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def get_engine() -> Engine:
    settings = get_settings()
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return _engine_for(settings.sqlalchemy_url, os.getpid())


@functools.cache
def _sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


# A unit-of-work factory such as session_scope: what long work (a download, a decode, a
# crawl) takes instead of a session, to open short transactions around it, never across it.
Sessions = Callable[[], AbstractContextManager[Session]]


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work: commits on success, rolls back on error. Callers of app/ own it."""
    session = _sessionmaker(get_engine())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _alembic_config():  # type: ignore[no-untyped-def]
    from pathlib import Path

    from alembic.config import Config

    root = Path(__file__).resolve().parent.parent
    cfg = Config(str(root / "alembic.ini"))
    cfg.set_main_option("script_location", str(root / "migrations"))
    return cfg


def migrate(revision: str = "head") -> None:
    """Brings the schema to ``revision`` (Alembic is the only way the schema changes)."""
    from alembic import command

    command.upgrade(_alembic_config(), revision)


def downgrade(revision: str) -> None:
    from alembic import command

    command.downgrade(_alembic_config(), revision)
