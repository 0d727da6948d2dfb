"""The application's own count of how often each task message started
(:class:`app.models.TaskAttempt`): a message whose worker process keeps dying is
redelivered again and again, and Celery counts none of it (celery#9082)."""

from __future__ import annotations

from sqlalchemy import Connection

from app.db import dialect_insert
from app.models import TaskAttempt, utcnow

# One statement, on every task start: the SQL as Postgres takes it, sent on the
# connection as it is (SQLAlchemy building and compiling the upsert cost several times
# its round trip).
_COUNT_START = """
INSERT INTO task_attempts (task_id, name, attempts, last_started_at)
VALUES (%(task_id)s, %(name)s, 1 + %(unwritten)s, %(now)s)
ON CONFLICT (task_id) DO UPDATE SET attempts = task_attempts.attempts + 1, last_started_at = %(now)s
RETURNING attempts
"""


def count_start(conn: Connection, *, task_id: str, name: str, unwritten: int = 0) -> int:
    """Counts one more start of the message ``task_id`` (a task named ``name``) and
    returns how many there have been. Commit before the task's work (``autocommit``).

    ``unwritten``: the starts before this one that were not written (a task that skips
    writing its first start says 1), counted when the message's row is created."""
    now = utcnow()
    if conn.dialect.name == "postgresql":
        row = conn.connection.driver_connection.execute(  # type: ignore[union-attr]
            _COUNT_START, {"task_id": task_id, "name": name, "now": now, "unwritten": unwritten}
        ).fetchone()
        assert row is not None  # RETURNING, one row
        return int(row[0])
    stmt = dialect_insert(conn)(TaskAttempt).values(
        task_id=task_id, name=name, attempts=1 + unwritten, last_started_at=now
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["task_id"], set_={"attempts": TaskAttempt.attempts + 1, "last_started_at": now}
    ).returning(TaskAttempt.attempts)
    return int(conn.execute(stmt).scalar_one())
