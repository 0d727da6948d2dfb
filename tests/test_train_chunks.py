"""Training as a job that outlives any one task: a chain of bounded chunks, each resumed
from the run's checkpoint, with its progress in Postgres, a clean stop, and a watchdog
for chains whose message was lost. Real footage, real Postgres, a live worker."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import start_worker
from sqlalchemy import update
from support.helpers import wait_until
from support.training import TINY, training_clips

import app.learn.train.loop as train_loop
from app.db import named_lock, session_scope
from app.learn import runs
from app.learn.encoder import load_checkpoint
from app.learn.train.curves import read_metrics
from app.learn.train.loop import TrainResult, train
from app.models import ModelVersion, TrainingRun, utcnow
from app.ops.status import overview

# Five steps; checkpoints only where a run (or a chunk) ends. One torch thread in the
# config itself: the reference (a module fixture, set up before any function fixture)
# and the chunks must split their reductions alike to round alike.
CONFIG = dataclasses.replace(TINY, steps=5, checkpoint_every=100, torch_threads=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return training_clips(tmp_path_factory.mktemp("footage"))


@pytest.fixture(scope="module")
def uninterrupted(videos: list[Path], tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The same run in one go, as the reference."""
    return train(CONFIG, videos, out_dir=tmp_path_factory.mktemp("whole") / "run")


def _start(settings: Any, videos: list[Path], **options: Any) -> TrainingRun:
    with session_scope() as session:
        return runs.start_run(
            session=session, settings=settings, name=f"chunks-{uuid.uuid4().hex[:8]}", config=CONFIG, videos=videos,
            **options,
        )  # fmt: skip


def _run(run_id: int) -> TrainingRun:
    with session_scope() as session:
        return session.get_one(TrainingRun, run_id)


def _chain(run_id: int, chunk: int, settings: Any, **budget: Any) -> list[runs.ChunkOutcome]:
    """Runs chunk after chunk as the workers would, until one says nothing follows."""
    outcomes: list[runs.ChunkOutcome] = []
    next_chunk: int | None = chunk
    while next_chunk is not None:
        assert len(outcomes) < 20, outcomes
        outcomes.append(runs.run_chunk(run_id, chunk=next_chunk, settings=settings, **budget))
        next_chunk = outcomes[-1].next_chunk
    return outcomes


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _tensors(value[key])]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


def _assert_same_run(out_dir: Path, reference: TrainResult) -> None:
    """Bit for bit: the final weights, the optimiser's state and every step's loss.
    (On CPU, with one thread and the data order a function of (seed, epoch, item), a
    resumed run repeats the same floating-point operations in the same order.)"""
    final = out_dir / reference.checkpoint.name
    got, _ = load_checkpoint(final)
    want, _ = load_checkpoint(reference.checkpoint)
    mine, theirs = got.state_dict(), want.state_dict()
    assert mine.keys() == theirs.keys()
    assert [k for k in theirs if not torch.equal(mine[k], theirs[k])] == []
    opt = _tensors(torch.load(out_dir / "last.pt", weights_only=True)["optimizer"])
    ref_opt = _tensors(torch.load(reference.out_dir / "last.pt", weights_only=True)["optimizer"])
    assert len(opt) == len(ref_opt) and all(torch.equal(a, b) for a, b in zip(opt, ref_opt, strict=True))
    rows, ref_rows = read_metrics(out_dir / "metrics.jsonl"), read_metrics(reference.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def test_a_run_longer_than_its_chunks_ends_as_one_uninterrupted_run(
    videos: list[Path], uninterrupted: TrainResult, settings: Any
) -> None:
    run = _start(settings, videos)
    assert run.state == runs.QUEUED and run.chunks == 0 and run.total_steps is None

    # Two steps a chunk: steps 1-2, 3-4, then 5 and the finishing (final weights, registry).
    outcomes = _chain(run.id, 1, settings, max_seconds=3600.0, max_steps=2)
    assert [o.state for o in outcomes] == [runs.RUNNING, runs.RUNNING, runs.DONE]
    assert [o.next_chunk for o in outcomes] == [2, 3, None]
    done = _run(run.id)
    assert (done.state, done.step, done.total_steps, done.chunks, done.error) == (runs.DONE, 5, 5, 3, None)
    assert done.model_version_id == outcomes[-1].model_id and done.finished_at is not None
    with session_scope() as session:
        model = session.get_one(ModelVersion, done.model_version_id)
        assert model.name == run.name and model.trained and not model.is_active
        assert model.checkpoint_path == str(Path(run.out_dir) / "model-step000005.pt")
        assert model.data_summary["steps"] == 5 and model.data_summary["clips"] == 5 * 4
        # The summary spans the chunks: the last steps' mean loss, as one run reports it.
        assert {k: model.metrics[k] for k in uninterrupted.final_metrics} == uninterrupted.final_metrics
    _assert_same_run(Path(run.out_dir), uninterrupted)

    # A chunk message delivered again after the run ended does nothing.
    again = runs.run_chunk(run.id, chunk=3, settings=settings, max_seconds=3600.0)
    assert again.next_chunk is None and _run(run.id).chunks == 3


def test_a_stop_ends_the_running_chunk_at_its_next_step_and_the_run_resumes_to_the_same_weights(
    videos: list[Path], uninterrupted: TrainResult, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _start(settings, videos)
    # The chunk waits before its second step until the stop has been asked for.
    stepped, stop_asked = threading.Event(), threading.Event()
    real_step, calls = train_loop._step, {"n": 0}

    def step_after_stop(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            stepped.set()
            assert stop_asked.wait(120)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_loop, "_step", step_after_stop)
    outcome: dict[str, runs.ChunkOutcome] = {}
    chunk = threading.Thread(
        target=lambda: outcome.update(first=runs.run_chunk(run.id, chunk=1, settings=settings, max_seconds=3600.0))
    )
    chunk.start()
    try:
        assert stepped.wait(120)
        with session_scope() as session:  # a chunk holds the run: it is asked to stop
            assert runs.stop_run(session=session, name=run.name).state == runs.STOPPING
        line = next(t for t in _overview_training() if t.name == run.name)
        assert (line.state, line.step, line.total_steps, line.chunks) == (runs.STOPPING, 1, 5, 0)
    finally:
        stop_asked.set()
        chunk.join(120)
    monkeypatch.setattr(train_loop, "_step", real_step)

    # It stopped after the step it was taking, with that step's resumable checkpoint.
    assert outcome["first"].state == runs.STOPPED and outcome["first"].next_chunk is None
    stopped = _run(run.id)
    assert (stopped.state, stopped.step, stopped.chunks, stopped.model_version_id) == (runs.STOPPED, 2, 1, None)
    assert torch.load(Path(run.out_dir) / "last.pt", weights_only=True)["step"] == 2
    assert not list(Path(run.out_dir).glob("model-step*.pt"))
    # The next chunk's message, already queued, finds the run stopped and does nothing.
    assert runs.run_chunk(run.id, chunk=2, settings=settings, max_seconds=3600.0).next_chunk is None
    assert _run(run.id).step == 2

    # Started again under its name, it continues from step 2 and ends where one run ends.
    with session_scope() as session:
        resumed = runs.start_run(session=session, settings=settings, name=run.name, config=CONFIG, videos=videos)
    assert resumed.id == run.id and resumed.state == runs.QUEUED
    outcomes = _chain(run.id, resumed.chunks + 1, settings, max_seconds=3600.0)
    assert [o.state for o in outcomes] == [runs.DONE]
    assert _run(run.id).chunks == 2
    _assert_same_run(Path(run.out_dir), uninterrupted)


def _overview_training() -> list[Any]:
    with session_scope() as session:
        return overview(session=session).training


def test_lost_chains_are_re_enqueued_and_a_chunk_that_keeps_dying_fails_the_run(
    videos: list[Path], settings: Any
) -> None:
    run = _start(settings, videos)
    # A message for a chunk other than the next one (a duplicate, a stale redelivery) does nothing.
    assert runs.run_chunk(run.id, chunk=2, settings=settings, max_seconds=3600.0).next_chunk is None
    assert _run(run.id).state == runs.QUEUED

    def stalled() -> list[tuple[int, int]]:
        with session_scope() as session:
            return [due for due in runs.stalled_runs(session=session, silent_s=600) if due[0] == run.id]

    def silent_for(seconds: float) -> None:
        with session_scope() as session:
            quiet_since = utcnow() - timedelta(seconds=seconds)
            session.execute(update(TrainingRun).where(TrainingRun.id == run.id).values(heartbeat_at=quiet_since))

    assert stalled() == []  # just enqueued
    silent_for(3600)
    with named_lock(runs.lock_name(run.id)) as got:  # a chunk is running: its silence is its own
        assert got and stalled() == []
    assert stalled() == [(run.id, 1)]  # nobody holds it and nothing was heard for an hour: chunk 1 again
    assert stalled() == []  # once per silence, not at every sweep

    # A chunk whose process died is started again by the redelivered message, a bounded
    # number of times: then the run fails with the reason.
    with session_scope() as session:
        session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run.id)
            .values(state=runs.RUNNING, attempts=settings.task_max_attempts)
        )
    outcome = runs.run_chunk(run.id, chunk=1, settings=settings, max_seconds=3600.0)
    assert outcome.state == runs.FAILED and outcome.next_chunk is None
    failed = _run(run.id)
    assert failed.state == runs.FAILED and f"started {settings.task_max_attempts + 1} times" in (failed.error or "")
    with session_scope() as session:
        status = overview(session=session)
    assert any(f.what == f"training run {run.name}" and "started" in f.reason for f in status.failures)


def _vidsim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.cli", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "250"},
    )  # fmt: skip


def test_cli_queues_a_run_that_status_shows_and_stop_stops_at_once(videos: list[Path], settings: Any) -> None:
    """`vidsim train --queue` records the run before any worker takes it (no train worker
    runs here): status shows it, and a stop, with no chunk running, is immediate."""
    import redis as redis_client

    name = f"cli-{uuid.uuid4().hex[:8]}"
    client = redis_client.Redis.from_url(settings.redis_url)
    queue = settings.broker_prefix + "train"
    before = client.llen(queue)
    try:
        queued = _vidsim("train", "--queue", "--name", name, "--steps", "3", "--videos", str(videos[0].parent))
        assert queued.returncode == 0, queued.stderr
        assert f"training run {name} queued" in queued.stdout and f"vidsim train --stop {name}" in queued.stdout
        assert client.llen(queue) == before + 1  # its first chunk, for the train workers
        with session_scope() as session:
            run = session.query(TrainingRun).filter_by(name=name).one()
        assert (run.state, run.chunks, len(run.videos), run.config["steps"]) == (runs.QUEUED, 0, len(videos), 3)
        status = _vidsim("status")
        assert status.returncode == 0, status.stderr
        assert f"training {name}: queued, step 0/?, 0 chunks done" in status.stdout
        stop = _vidsim("train", "--stop", name)
        assert stop.returncode == 0, stop.stderr
        assert f"{name} stopped at step 0" in stop.stdout and f"--name {name} --queue" in stop.stdout
        assert _run(run.id).state == runs.STOPPED
        unknown = _vidsim("train", "--stop", "no-such-run")
        assert unknown.returncode == 1 and "no training run named 'no-such-run'" in unknown.stderr
        # Training it here too would write into the workers' run: refused, with the way on.
        inline = _vidsim("train", "--name", name, "--steps", "3", "--videos", str(videos[0].parent))
        assert inline.returncode == 1 and f"{name} is a training run of the workers" in inline.stderr
        assert f"vidsim train --name {name} --queue" in inline.stderr
    finally:
        client.close()


def test_a_queued_run_chains_its_chunks_to_the_end_through_a_worker(
    videos: list[Path], data_dir: Path, settings: Any
) -> None:
    """vidsim.train through a live worker whose chunks last one step each
    (VIDSIM_TRAIN_CHUNK_S=0): three steps take three chunks and a fourth finishes,
    registers the model and starts its rollout."""
    from workers.app import celery_app

    name = f"worker-{uuid.uuid4().hex[:8]}"
    overrides = {"steps": 3, "batch_size": 4, "frames": 2, "checkpoint_every": 100, "norm_videos": 6}
    # (the rollout gate left out: this is about the chain, not whether 3 steps improve the model)
    env = {"VIDSIM_TRAIN_CHUNK_S": "0", "VIDSIM_ROLLOUT_GATE": "false"}
    with start_worker(data_dir / "train-worker.log", queues="train,maintenance", beat=False, extra_env=env):
        celery_app.send_task(
            "vidsim.train",
            kwargs={"videos": [str(v) for v in videos], "overrides": overrides, "name": name, "activate": True},
        )

        def finished() -> TrainingRun | None:
            with session_scope() as session:
                found = session.query(TrainingRun).filter_by(name=name).one_or_none()
                assert found is None or found.state not in (runs.FAILED, runs.STOPPED), found and found.error
                return found if found is not None and found.state == runs.DONE else None

        run = wait_until(finished, timeout_s=300, what="the training run to finish")
        assert (run.step, run.total_steps, run.chunks) == (3, 3, 4)

        def rolling_out() -> ModelVersion | None:
            with session_scope() as session:
                model = session.get_one(ModelVersion, run.model_version_id)
                return model if model.status in ("warming", "active") else None

        model = wait_until(rolling_out, timeout_s=60, what="the new model's rollout to start")
    assert model.name == name and model.checkpoint_path == str(Path(run.out_dir) / "model-step000003.pt")
    assert [r["step"] for r in read_metrics(Path(run.out_dir) / "metrics.jsonl")] == [1, 2, 3]
