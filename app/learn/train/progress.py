"""The training progress bar on the terminal (steps, loss, clips/s)."""

from __future__ import annotations


class ProgressBar:
    """A rich progress bar (steps, loss, clips/s), or nothing."""

    def __init__(self, total: int, done: int, *, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TimeRemainingColumn(),
            )  # fmt: skip
            self._task = self._bar.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> ProgressBar:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, row: dict[str, float]) -> None:
        if self._bar is not None:
            info = f"loss {row['loss']:.1f}  {row['clips_per_s']:.1f} clips/s"
            self._bar.update(self._task, completed=step, info=info)
