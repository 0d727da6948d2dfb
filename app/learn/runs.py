"""Training runs as jobs that outlive any one task.

The specification's training takes hours to days; no task may run that long (the
``train`` queue's hard limit stays below the broker's visibility timeout, or the message
would be delivered again and trained twice at once). So a run is a row of
``training_runs`` and a chain of chunks. Each chunk (task ``vidsim.train_chunk``)
resumes the run from its ``last.pt``, trains until its time budget is spent, saves
``last.pt`` and says which chunk comes next; its task enqueues that one once this module
has committed. The chunk that reaches the last step registers the model version (whose
rollout then starts when the run asked for it). A resumed run takes the same steps as an
uninterrupted one (:mod:`app.learn.train.loop`), so the chunks train the same weights.

One chunk of a run at a time: a chunk holds the run's lock (:func:`app.db.named_lock`)
while it trains, and a message for any chunk but the next (a duplicate, a late
redelivery) finds nothing to do. A chunk whose process died is started again by its
redelivered message, up to ``task_max_attempts`` times, then the run fails with the
reason. A chain whose message was lost (a chunk killed by its hard time limit has its
message acknowledged) is found by :func:`stalled_runs` and enqueued again.

:func:`stop_run` stops a run at once when no chunk of it runs; otherwise the running
chunk ends after its current step. A stopped or failed run continues where it stopped
when started again under its name (:func:`start_run`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import named_lock, session_scope
from app.logs import one_line
from app.models import ModelVersion, TrainingRun, utcnow

# Torch and the training stack load only where a chunk trains or registers its model:
# stopping a run (`vidsim train --stop`) and beat's sweep need none of it.
if TYPE_CHECKING:
    from app.learn.train.config import TrainConfig
    from app.learn.train.loop import TrainResult

logger = logging.getLogger(__name__)

QUEUED, RUNNING, STOPPING, STOPPED, DONE, FAILED = "queued", "running", "stopping", "stopped", "done", "failed"
LIVE = (QUEUED, RUNNING, STOPPING)  # a chunk is running or will come


@dataclass(frozen=True)
class ChunkOutcome:
    """What a chunk did, and what its task enqueues after it."""

    state: str  # the run's state afterwards
    next_chunk: int | None = None  # enqueue this chunk of the run
    model_id: int | None = None  # the model version this chunk registered
    activate: bool = False  # start model_id's rollout


@dataclass(frozen=True)
class _Claim:
    """What a chunk trains, read from the run's row when it starts."""

    name: str
    config: TrainConfig
    videos: list[Path]
    out_dir: Path
    init_checkpoint: Path | None


def lock_name(run_id: int) -> str:
    """The lock a chunk of run ``run_id`` holds while it runs."""
    return f"training-run:{run_id}"


def find_run(*, session: Session, name: str, for_update: bool = False) -> TrainingRun | None:
    """The training run named ``name``, if any (with its row locked: ``for_update``)."""
    stmt = select(TrainingRun).where(TrainingRun.name == name)
    return session.scalar(stmt.with_for_update() if for_update else stmt)


def next_chunk(run: TrainingRun) -> int | None:
    """The chunk of ``run`` to enqueue, if one is due."""
    return run.chunks + 1 if run.state in (QUEUED, RUNNING) else None


def start_run(
    *,
    session: Session,
    settings: Settings,
    name: str,
    config: TrainConfig,
    videos: Sequence[Path],
    preset: str | None = None,
    init_model_id: int | None = None,
    activate: bool = False,
) -> TrainingRun:
    """Records run ``name``, training ``config`` on ``videos`` (fine-tuning model
    ``init_model_id`` when given; ``activate``: roll the model out once trained). A run of
    that name that stopped or failed is queued again, to continue where it stopped, with
    the config and videos it started with; a live or finished one is left as it is.
    Enqueue :func:`next_chunk` once this commits."""
    from app.learn.rollout import parent_checkpoint, run_dir

    run = find_run(session=session, name=name, for_update=True)
    if run is not None:
        if run.state in (STOPPED, FAILED):
            logger.info("training run %s: queued again at step %d (was %s)", name, run.step, run.state)
            run.state, run.error, run.attempts, run.finished_at, run.heartbeat_at = QUEUED, None, 0, None, utcnow()
        return run
    if not videos:
        raise ValueError("no training videos: add library videos or crawl sources first")
    if session.scalar(select(ModelVersion.id).where(ModelVersion.name == name)) is not None:
        raise ValueError(f"a model version is already named {name!r}: give the run another name")
    init = parent_checkpoint(session=session, model_id=init_model_id) if init_model_id is not None else None
    run = TrainingRun(
        name=name, preset=preset, config=config.to_dict(), videos=[str(v) for v in videos],
        out_dir=str(run_dir(name, settings=settings)), init_model_id=init_model_id,
        init_checkpoint=str(init) if init else None, activate=activate, state=QUEUED, step=0, chunks=0, attempts=0,
        heartbeat_at=utcnow(),
    )  # fmt: skip
    session.add(run)
    session.flush()
    logger.info("training run %d %s: %d videos, into %s", run.id, name, len(videos), run.out_dir)
    return run


def run_chunk(
    run_id: int, *, chunk: int, settings: Settings, max_seconds: float, max_steps: int | None = None
) -> ChunkOutcome:
    """Trains chunk ``chunk`` of run ``run_id``: from the run's ``last.pt`` until
    ``max_seconds`` (or ``max_steps`` steps) have passed after a step, and at least one
    step or the finishing work, so every chunk makes progress. A chunk that is not the
    run's next, or whose run is held by another chunk or no longer live, does nothing.
    Commits its own short transactions; none is open while it trains."""
    with named_lock(lock_name(run_id), settings=settings) as got:
        if not got:
            logger.info("training run %d: another chunk is running; chunk %d does nothing", run_id, chunk)
            return ChunkOutcome(state=RUNNING)
        with session_scope() as session:
            claim = _claim(session, run_id, chunk, settings)
        if isinstance(claim, ChunkOutcome):
            return claim
        from app.learn.train.loop import train

        budget = _Budget(run_id, max_seconds=max_seconds, max_steps=max_steps)
        logger.info("training run %d %s: chunk %d starts (budget %.0f s)", run_id, claim.name, chunk, max_seconds)
        try:
            result = train(claim.config, claim.videos, out_dir=claim.out_dir, resume=True,
                           init_checkpoint=claim.init_checkpoint, keep_going=budget)  # fmt: skip
        except Exception as exc:
            logger.exception("training run %d %s: chunk %d failed", run_id, claim.name, chunk)
            with session_scope() as session:
                run = session.get_one(TrainingRun, run_id, with_for_update=True)
                _end(run, FAILED, error=f"chunk {chunk}: {type(exc).__name__}: {one_line(exc)}"[:1000])
            return ChunkOutcome(state=FAILED)
        with session_scope() as session:
            return _record(session, run_id, result)


def stop_run(*, session: Session, name: str, settings: Settings | None = None) -> TrainingRun:
    """Stops run ``name``: at once (``stopped``) when no chunk of it runs, else
    ``stopping`` until its running chunk ends after its current step. Runs that ended are
    left as they are. Raises LookupError for an unknown name."""
    run = find_run(session=session, name=name, for_update=True)
    if run is None:
        raise LookupError(f"no training run named {name!r}")
    if run.state in (QUEUED, RUNNING):
        # The row stays locked until the caller commits, and a chunk locks it to start:
        # none can start in between and miss the stop.
        with named_lock(lock_name(run.id), settings=settings) as idle:
            if idle:
                _end(run, STOPPED)
            else:
                run.state = STOPPING
        logger.info("training run %s: %s at step %d", name, run.state, run.step)
    return run


def stalled_runs(*, session: Session, silent_s: float, settings: Settings | None = None) -> list[tuple[int, int]]:
    """(run id, chunk to enqueue) of the live runs that no chunk holds and nothing was
    heard of for ``silent_s`` seconds: their chain was lost (a chunk killed by its hard
    time limit has its message acknowledged; an enqueue failed). Each is counted as heard
    of now, so it is enqueued once per silence. Enqueue them once this commits."""
    cutoff = utcnow() - timedelta(seconds=silent_s)
    stmt = select(TrainingRun).where(TrainingRun.state.in_(LIVE), TrainingRun.heartbeat_at < cutoff)
    due = []
    for run in session.scalars(stmt.order_by(TrainingRun.id).with_for_update(skip_locked=True)):
        with named_lock(lock_name(run.id), settings=settings) as idle:
            if not idle:
                continue  # a chunk is running (loading, finishing): its silence is its own
        run.heartbeat_at = utcnow()
        due.append((run.id, run.chunks + 1))
        logger.warning("training run %s: nothing heard for %.0f s and no chunk running; enqueueing chunk %d",
                       run.name, silent_s, run.chunks + 1)  # fmt: skip
    return due


def _claim(session: Session, run_id: int, chunk: int, settings: Settings) -> _Claim | ChunkOutcome:
    from app.learn.train.config import TrainConfig

    run = session.get(TrainingRun, run_id, with_for_update=True)
    if run is None:
        logger.warning("training run %d: no such run; chunk %d does nothing", run_id, chunk)
        return ChunkOutcome(state=FAILED)
    if run.state == STOPPING:  # asked while no chunk ran: the stop takes effect now
        _end(run, STOPPED)
        logger.info("training run %s: stopped at step %d", run.name, run.step)
        return ChunkOutcome(state=STOPPED)
    if run.state not in (QUEUED, RUNNING) or chunk != run.chunks + 1:
        logger.info("training run %s: chunk %d is not due (%s, %d chunks done); it does nothing",
                    run.name, chunk, run.state, run.chunks)  # fmt: skip
        return ChunkOutcome(state=run.state)
    run.attempts += 1
    if run.attempts > settings.task_max_attempts:
        _end(run, FAILED, error=f"chunk {chunk} started {run.attempts} times without finishing: its process died "
                                "or it ran past the train queue's time limit (see the worker log)")  # fmt: skip
        logger.error("training run %s: %s", run.name, run.error)
        return ChunkOutcome(state=FAILED)
    run.state, run.heartbeat_at = RUNNING, utcnow()
    return _Claim(
        name=run.name,
        config=TrainConfig.from_dict(run.config),
        videos=[Path(v) for v in run.videos],
        out_dir=Path(run.out_dir),
        init_checkpoint=Path(run.init_checkpoint) if run.init_checkpoint else None,
    )


def _record(session: Session, run_id: int, result: TrainResult) -> ChunkOutcome:
    from app.learn import registry

    run = session.get_one(TrainingRun, run_id, with_for_update=True)
    run.step, run.total_steps, run.chunks, run.attempts = result.steps, result.total_steps, run.chunks + 1, 0
    run.heartbeat_at = utcnow()
    if result.finished:
        model = registry.register_trained(session=session, result=result, name=run.name, parent_id=run.init_model_id)
        run.model_version_id = model.id
        _end(run, DONE)
        logger.info("training run %s: done in %d chunks; model %d registered", run.name, run.chunks, model.id)
        return ChunkOutcome(state=DONE, model_id=model.id, activate=run.activate)
    if run.state == STOPPING:
        _end(run, STOPPED)
        logger.info("training run %s: stopped at step %d of %d", run.name, run.step, run.total_steps)
        return ChunkOutcome(state=STOPPED)
    logger.info("training run %s: chunk %d ended at step %d of %d", run.name, run.chunks, run.step, run.total_steps)
    return ChunkOutcome(state=RUNNING, next_chunk=run.chunks + 1)


def _end(run: TrainingRun, state: str, *, error: str | None = None) -> None:
    run.state, run.error, run.finished_at = state, error, utcnow()


class _Budget:
    """A chunk's ``keep_going``: records each step in the run's row (its progress and
    heartbeat, read back with the run's state) and says stop once the run is stopping,
    or once the chunk has taken a step and its time (or step) budget is spent."""

    def __init__(self, run_id: int, *, max_seconds: float, max_steps: int | None) -> None:
        self.run_id = run_id
        self.deadline = time.monotonic() + max_seconds
        self.max_steps = max_steps
        self.first_step: int | None = None

    def __call__(self, step: int, total_steps: int) -> bool:
        if self.first_step is None:
            self.first_step = step
        if self._heartbeat(step, total_steps) == STOPPING:
            return False
        taken = step - self.first_step
        if taken == 0:  # every chunk makes progress: a step, or the finishing work
            return True
        if self.max_steps is not None and taken >= self.max_steps:
            return False
        return time.monotonic() < self.deadline

    def _heartbeat(self, step: int, total_steps: int) -> str | None:
        try:
            with session_scope() as session:
                stmt = (
                    update(TrainingRun)
                    .where(TrainingRun.id == self.run_id)
                    .values(step=step, total_steps=total_steps, heartbeat_at=utcnow())
                    .returning(TrainingRun.state)
                )
                return session.execute(stmt).scalar_one_or_none()
        except (OperationalError, InterfaceError) as exc:
            # A database restart must not cost hours of training: the chunk goes on to its
            # budget; the step is recorded when the database is back.
            logger.warning("training run %d: cannot record step %d (%s); training on", self.run_id, step,
                           type(exc).__name__)  # fmt: skip
            return None
