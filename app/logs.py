"""Logs an operator can query: one JSON object per line, carrying the event being served.

Code that works for an event binds its id once (``log_context(event_id=...)``); every
record logged inside, by vidsim or by a library, carries it as a field, so
``jq 'select(.event_id == "...")'`` shows one event's whole path across workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

_context: ContextVar[dict[str, Any]] = ContextVar("vidsim_log_context", default={})  # noqa: B039 (never mutated)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Adds ``fields`` (None values skipped) to every record logged inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def set_log_context(**fields: Any) -> None:
    """Replaces the context outright (for Celery's task_prerun/postrun signals, which
    cannot wrap the task in a block)."""
    _context.set({k: v for k, v in fields.items() if v is not None})


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The context and the ``extra=`` fields of ``record``."""
    fields = dict(_context.get())
    fields.update({k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")})
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        doc.update(record_fields(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = record_fields(record)
        return line + "".join(f" {k}={v}" for k, v in fields.items()) if fields else line


def formatter(fmt: str = "json") -> logging.Formatter:
    """The formatter of ``fmt``: "json" (one object per line) or "text"."""
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure_logging(level: str | int = "INFO", fmt: str = "json") -> None:
    """Routes the root logger to stderr in ``fmt`` ("json" or "text"), and with it what
    would otherwise reach stderr bare: Python warnings, uncaught exceptions (of the main
    thread and others), and records of loggers that do not propagate and have no handler
    of their own (billiard's ``multiprocessing`` logger reports a pool process that died
    that way), which logging hands to its handler of last resort."""
    # The real stderr, even once sys.stderr is redirected into logging (a worker's is).
    stream = sys.__stderr__ or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    last_resort = logging.StreamHandler(stream)
    last_resort.setLevel(logging.WARNING)  # as logging's own last resort
    last_resort.setFormatter(formatter(fmt))
    logging.lastResort = last_resort
    logging.captureWarnings(True)
    # An uncaught exception as one record, not a traceback printed piece by piece (into
    # a stderr that may itself be redirected into logging: hundreds of records).
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("uncaught").critical("uncaught %s", exc_type.__name__, exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:  # None: the thread's SystemExit
        _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def one_line(reason: BaseException | str, limit: int = 200) -> str:
    """A reason an operator reads in one line: white space folded, at most ``limit``
    characters (an exception without a message is named by its type)."""
    text = " ".join(str(reason).split()) or type(reason).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
