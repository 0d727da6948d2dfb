"""Engine and sessions. Engines are made per process (never shared across fork)."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import select
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DisconnectionError, InvalidatePoolError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings


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
    # LIFO: the connection checked in last is checked out next, so a process's work goes
    # on one hot connection (no ping) while the others sit idle (pinged when next used).
    engine = create_engine(url, pool_size=5, max_overflow=5, pool_use_lifo=True)
    _check_on_checkout(engine)
    return engine


# A pooled connection is checked as it is checked out, as pool_pre_ping did, but with a
# round trip (a ping) only when it is likely to be needed: the connection sat idle in the
# pool for longer than this, or Postgres sent something on it while it sat there. An idle
# session is sent nothing, so a socket with something to read is one whose server ended
# it (a restart, a fast shutdown, pg_terminate_backend: the FATAL message and the close)
# or, rarely, a notice; the ping tells which. A connection broken in a way nobody noticed
# (no close reached this machine) and checked out within the idle limit fails its first
# statement instead, and the task is retried as for any database outage
# (workers/tasks.py, DATABASE_DOWN). pool_pre_ping pinged every checkout: three round trips
# of a warm event's eleven, one per checkout.
PING_AFTER_IDLE_S = 10.0


def _check_on_checkout(engine: Engine) -> None:
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn, record):  # type: ignore[no-untyped-def]
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn, record, _proxy):  # type: ignore[no-untyped-def]
        idle_since = record.info.get("idle_since")  # None: connected for this checkout
        record.info["pinged"] = False
        if idle_since is None:
            return
        if dbapi_conn.closed or getattr(dbapi_conn, "broken", False):
            raise DisconnectionError("connection closed while in the pool")
        if time.monotonic() - idle_since < PING_AFTER_IDLE_S and not _readable(dbapi_conn.fileno()):
            return
        record.info["pinged"] = True
        try:
            dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # As pool_pre_ping does: the pool replaces this connection (a new one is checked
            # out instead) and every other connection made before now, at its checkout.
            raise InvalidatePoolError(f"connection check failed: {type(exc).__name__}: {exc}") from exc


def _readable(fd: int) -> bool:
    """Whether the socket ``fd`` has something to read (or its peer closed it), at once."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


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


@contextmanager
def autocommit() -> Iterator[Connection]:
    """A connection on which each statement commits by itself: for a single statement that
    must be committed before the work that follows it (no BEGIN and COMMIT around it)."""
    with get_engine().connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


def dialect_insert(session: Session | Connection) -> Callable[..., Any]:
    """The ``insert`` of the session's (or connection's) database, which has
    ``on_conflict_do_update`` (Postgres, or SQLite when embedded)."""
    dialect = session.dialect if isinstance(session, Connection) else session.get_bind().dialect
    return postgresql.insert if dialect.name == "postgresql" else sqlite.insert


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(f"vidsim:{name}".encode()).digest()[:8], "big", signed=True)


@contextmanager
def named_lock(name: str, *, settings: Settings | None = None) -> Iterator[bool]:
    """Yields True while holding the lock ``name``, False (at once) if someone else has it.

    On Postgres, a session-level advisory lock on a connection of its own, released by
    Postgres when that connection closes, so a killed worker cannot leave it held; no
    transaction stays open meanwhile. Embedded on SQLite, an flock on a file."""
    engine = get_engine()
    if engine.dialect.name == "postgresql":
        key = _lock_key(name)
        with engine.connect() as conn:
            got = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}))
            conn.commit()  # the lock is the session's: no transaction stays open meanwhile
            try:
                yield got
            finally:
                if got:
                    try:
                        conn.scalar(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                        conn.commit()
                    except Exception:  # the connection is broken: closing it frees the lock
                        conn.invalidate()
                        raise
        return
    folder = (settings or get_settings()).data_dir / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name.replace(':', '-')}.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
