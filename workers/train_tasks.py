"""Training on the ``train`` queue (a GPU worker: ``vidsim worker --queues train --pool solo``).

``vidsim.train`` records a training run and enqueues its first chunk; each
``vidsim.train_chunk`` trains within ``VIDSIM_TRAIN_CHUNK_S`` (well below the queue's
hard limit), then enqueues the next; the last registers the model and, when asked,
starts its rollout. Beat re-enqueues chains whose message was lost (app.learn.runs)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.config import get_settings
from app.db import session_scope
from app.learn import gate, rollout, runs
from workers.app import TIME_LIMITS, celery_app
from workers.tasks import RetriedTask, activate_model

logger = logging.getLogger(__name__)

# A chunk's start (loading the model, the loader's first batches), its last step and its
# end (the checkpoint, or the finishing work of the last chunk) come on top of its
# budget: this much of the hard limit is kept for them.
CHUNK_MARGIN_S = 600.0


# RetriedTask: a task that meets Postgres down is retried until it is back (a chunk
# resumes from last.pt), rather than failing with its message acknowledged.
@celery_app.task(name="vidsim.train", base=RetriedTask, bind=True, time_limit=TIME_LIMITS["train"])
def train(
    self: Any,
    preset: str = "cpu-small",
    videos: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    name: str | None = None,
    init_model_id: int | None = None,
    epochs: int | None = None,
    activate: bool = False,
) -> int:
    """Starts training run ``name`` (or, for a stopped or failed run of that name, starts
    it again where it stopped): pre-training, or fine-tuning from ``init_model_id``; with
    ``activate``, the model's rollout starts once trained. A redelivered message finds the
    run it recorded (the run is named after the message unless ``name`` is given).
    Returns the run's id."""
    settings = get_settings()
    name = name or rollout.run_name(preset=preset, init_model_id=init_model_id, suffix=(self.request.id or "local")[:8])
    config = rollout.training_config(
        preset, overrides=overrides, finetune_epochs=(epochs or 5) if init_model_id else None
    )
    with session_scope() as session:
        files = [Path(v) for v in videos] if videos else rollout.training_files(session=session)
        run = runs.start_run(session=session, settings=settings, name=name, config=config, videos=files,
                             preset=preset, init_model_id=init_model_id, activate=activate)  # fmt: skip
        run_id, chunk = run.id, runs.next_chunk(run)
    if chunk is not None:
        train_chunk.delay(run_id, chunk)
    return run_id


@celery_app.task(name="vidsim.train_chunk", base=RetriedTask, time_limit=TIME_LIMITS["train"])
def train_chunk(run_id: int, chunk: int) -> str:
    """One chunk of a training run; enqueues what comes after it."""
    budget_s = min(get_settings().train_chunk_s, TIME_LIMITS["train"] - CHUNK_MARGIN_S)
    outcome = runs.run_chunk(run_id, chunk=chunk, settings=get_settings(), max_seconds=budget_s)
    if outcome.next_chunk is not None:
        train_chunk.delay(run_id, outcome.next_chunk)
    if outcome.model_id is not None and outcome.activate and _passes_gate(outcome.model_id):
        activate_model.delay(outcome.model_id)
    return outcome.state


def _passes_gate(model_id: int) -> bool:
    """The rollout gate (app.learn.gate): a trained model no better than the active one
    at finding the library's copies is registered, and not rolled out."""
    try:
        with session_scope() as session:
            verdict = gate.check(session=session, model_id=model_id, settings=get_settings())
    except Exception:  # a gate that cannot measure lets nothing through; the model stays registered
        logger.exception("model %d not rolled out: the rollout gate could not score it "
                         "(`vidsim model activate %d` tries again)", model_id, model_id)  # fmt: skip
        return False
    refusal = verdict.refusal() if verdict is not None else None
    if verdict is not None and refusal:
        logger.warning("model %d not rolled out: the rollout gate found it worse: %s: %s "
                       "(`vidsim model activate %d --force` serves it anyway)",
                       model_id, refusal, verdict.summary(), model_id)  # fmt: skip
        return False
    return True


@celery_app.task(name="vidsim.resume_stalled_training", time_limit=TIME_LIMITS["maintenance"])
def resume_stalled_training() -> int:
    """Beat: enqueues again the chains of training runs that went silent with no chunk
    running (longer than a chunk may last)."""
    with session_scope() as session:
        due = runs.stalled_runs(session=session, silent_s=TIME_LIMITS["train"])
    for run_id, chunk in due:
        train_chunk.delay(run_id, chunk)
    return len(due)
