"""What every `vidsim` command shares: the two consoles, the readable failure (one line
and how to fix it), a session on a migrated database, and progress bars on stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import rich.progress
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

console = Console()
err = Console(stderr=True)  # errors and progress bars, so that stdout stays the answer

# Commands that hand their remaining options to another program (celery, a benchmark).
PASS_EXTRA_ARGS: dict[str, Any] = {"allow_extra_args": True, "ignore_unknown_options": True}

T = TypeVar("T")


def print_error(message: str, fix: str | None = None) -> None:
    err.print(f"[red]error:[/red] {message}" + (f"\n  fix: {fix}" if fix else ""))


class Fail(Exception):
    """A readable failure: message, then how to fix it (scripts/cli.py prints it and exits 1)."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


def db_session() -> AbstractContextManager[Session]:
    """A unit of work (commits on success) on a database migrated to the current schema."""
    from app.db import migrate, session_scope

    migrate()  # cheap when current; a fresh embedded install needs its schema
    return session_scope()


def track(items: Sequence[T], *, description: str, hide_below: int = 0) -> Iterator[T]:
    """Iterates ``items`` behind a progress bar (none for fewer than ``hide_below`` items)."""
    yield from rich.progress.track(items, description=description, console=err, disable=len(items) < hide_below)


@contextmanager
def counting_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """One bar, fed by a ``progress(done, total)`` callback."""
    with Progress(console=err) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


class StageBars:
    """A ``progress(stage, done, total, note)`` callback (app.crawl's), drawn as one bar per stage."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int | None, note: str) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total, description=f"{stage} {note}")


@contextmanager
def stage_bars() -> Iterator[StageBars]:
    """Bars with counts and elapsed time, one per stage, that stay on screen when done."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        yield StageBars(progress)
