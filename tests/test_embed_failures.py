"""Embeddings that fail, rollouts that must not stall and events that must not be
forgotten, through live workers and beat on a stack of this module's own (its database
and broker prefix on the shared Postgres and Redis), with real encoded videos.

- A video added to the library while a model warms up is embedded with it by the
  rollout itself, which then completes (the backfill list is not only the one taken at
  activation).
- An embedding that always raises something other than a VideoError (here: a model
  whose checkpoint file is corrupt) ends after VIDSIM_EMBED_MAX_ATTEMPTS failed tasks
  with one error callback, instead of embed and serve sending each other the event for
  ever.
- An event left parked in ``embedding`` with no message in flight (a lost message, a
  crash between commit and enqueue) is re-driven by beat's sweeper and answered; one
  parked past VIDSIM_PARKED_EVENT_DEADLINE_S is answered with an error.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from support.faultkit import Hook, Stack, Supervised, shared_stack
from support.helpers import wait_until
from support.media import make_video

from app.config import DEV_WEBHOOK_SECRET
from app.learn import registry
from app.learn.encoder import EncoderConfig, initial_encoder, save_checkpoint
from app.models import Embedding, EmbeddingJob, Event, IndexVersion, ModelVersion, TaskAttempt, Video, utcnow

MAX_ATTEMPTS = 2
REQUEUE_AFTER_S = 2.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = {
        "VIDSIM_EMBED_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "VIDSIM_EMBED_REQUEUE_AFTER_S": str(REQUEUE_AFTER_S),
        "VIDSIM_SWEEP_INTERVAL_S": "0.5",
        "VIDSIM_OUTBOX_SWEEP_INTERVAL_S": "0.5",
        "VIDSIM_CALLBACK_TIMEOUT_S": "5",
    }
    with shared_stack(tmp_path_factory.mktemp("embed-failures"), **settings) as s, s.beat():
        yield s


@pytest.fixture(scope="module")
def server(stack: Stack) -> Iterator[Supervised]:
    """The worker of every queue but ``embed``: each test decides when embedding runs."""
    with stack.worker("server", pool="solo", queues="events,callbacks,maintenance") as proc:
        yield proc


def _embedder(stack: Stack) -> Supervised:
    return stack.worker("embedder", pool="solo", queues="embed")


def _library_video(stack: Stack, name: str, pattern: str, *, status: str = "registered") -> int:
    path = make_video(stack.media_dir / f"{name}-{uuid.uuid4().hex[:6]}.mp4", seconds=2, pattern=pattern)
    with stack.session() as s:
        video = Video(uri=path.as_uri(), local_path=str(path), in_library=True, status=status, collection=name)
        s.add(video)
        s.flush()
        return video.id


def _model(stack: Stack, name: str, checkpoint: Path) -> int:
    config = EncoderConfig(frame_size=64, embed_dim=64, projector_hidden=64)
    with stack.session() as s:
        registry.active_model(session=s)  # the initial model serves meanwhile
        model = registry.register_model(session=s, name=name, checkpoint_path=checkpoint, config=config)
        return model.id


def _event(video_id: int, url: str, **fields: object) -> dict:
    return {"event_id": f"ef-{uuid.uuid4().hex[:8]}", "video_id": video_id, "callback_url": url, "k": 2, **fields}


def test_a_video_added_while_a_model_warms_is_embedded_and_the_rollout_completes(
    stack: Stack, server: Supervised, tmp_path: Path
) -> None:
    collection = f"warm-{uuid.uuid4().hex[:6]}"
    first = [_library_video(stack, collection, p) for p in ("testsrc2", "mandelbrot")]
    config = EncoderConfig(frame_size=64, embed_dim=64, projector_hidden=64)
    checkpoint = save_checkpoint(stack.data_dir / f"{collection}.pt", initial_encoder(config, seed=1))
    model_id = _model(stack, collection, checkpoint)

    done = stack.cli("model", "activate", str(model_id), "--force")  # a random model: no gate
    assert done.returncode == 0, done.stderr
    # The activation's backfill is taken and waits in the embed queue (nobody embeds yet).
    wait_until(lambda: stack.queue_depths()["embed"] >= len(first), timeout_s=60, what="the backfill")
    added = _library_video(stack, collection, "smptebars")

    with _embedder(stack):
        wait_until(lambda: _status(stack, model_id) == "active", timeout_s=120, what=f"model {model_id} to serve")
        with stack.session() as s:
            index = s.scalars(select(IndexVersion).where(IndexVersion.is_active)).one()
            embedded = s.scalar(
                select(func.count()).where(
                    Embedding.model_version_id == model_id, Embedding.video_id.in_([*first, added])
                )
            )
        assert index.model_version_id == model_id
        assert embedded == 3

        with Hook(DEV_WEBHOOK_SECRET) as hook:
            event = _event(added, hook.url, collection=collection)
            stack.publish([event])
            got = hook.wait_delivered({event["event_id"]}, timeout_s=60)
    body = got[event["event_id"]][0].payload
    assert body["error"] is None, body
    assert body["model_version"] == collection and body["index_version"] == index.id
    assert {r["video_id"] for r in body["results"]} == set(first)
    assert "waits" in stack.log("server")  # the rollout said why it waited


def _status(stack: Stack, model_id: int) -> str:
    with stack.session() as s:
        return s.get_one(ModelVersion, model_id).status


def test_an_embedding_that_always_raises_ends_after_its_attempts_with_one_error_callback(
    stack: Stack, server: Supervised
) -> None:
    """A ready video (embedded by the model before) and an active model whose checkpoint
    is corrupt: every embedding raises (not a VideoError). Each failed task used to leave
    the video `ready` and send the event back to serving, which enqueued another
    embedding: a loop that never answered."""
    video_id = _library_video(stack, "raise", "testsrc2", status="ready")
    corrupt = stack.data_dir / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    broken = _model(stack, f"broken-{uuid.uuid4().hex[:6]}", corrupt)
    with stack.session() as s:
        previous = registry.active_model(session=s).id
        registry.activate(session=s, model_id=broken)
    try:
        with _embedder(stack), Hook(DEV_WEBHOOK_SECRET) as hook:
            started = utcnow()
            event = _event(video_id, hook.url)
            stack.publish([event])
            got = hook.wait_delivered({event["event_id"]}, timeout_s=120)
            assert event["event_id"] in got, stack.log("embedder")[-3000:]
            # Nothing more is asked for once the event is answered: no loop. (Messages
            # already queued by then run, find the embedding given up, and do nothing.)
            wait_until(lambda: stack.queue_depths()["embed"] == 0, timeout_s=60, what="the embed queue to drain")
            time.sleep(2)  # the last one popped has recorded its start
            answered = _embed_tasks_since(stack, started)
            time.sleep(5)
            assert _embed_tasks_since(stack, started) == answered
            assert len(hook.for_event(event["event_id"])) == 1
            with stack.session() as s:
                job = s.get_one(EmbeddingJob, (broken, video_id))
    finally:
        with stack.session() as s:
            registry.activate(session=s, model_id=previous)
    body = got[event["event_id"]][0].payload
    assert body["results"] == [] and "could not be embedded" in body["error"], body
    # Each failed task counted once. (The sweeper may also have re-driven the event while
    # it waited: those extra messages found the embedding given up and did nothing.)
    assert job.given_up and job.attempts == MAX_ATTEMPTS, (job.attempts, job.last_error)
    assert "UnpicklingError" in (job.last_error or "")


def _embed_tasks_since(stack: Stack, started: datetime) -> int:
    with stack.session() as s:
        stmt = select(func.count()).where(
            TaskAttempt.name == "vidsim.embed_video", TaskAttempt.last_started_at >= started
        )
        return s.scalar(stmt) or 0


def test_a_parked_event_with_no_message_in_flight_is_redriven_and_answered(stack: Stack, server: Supervised) -> None:
    """The event is recorded as serving leaves it (parked, waiting for its video's
    embedding) but the embed message was never sent; another has been parked past the
    deadline and is answered with an error."""
    video_id = _library_video(stack, "parked", "mandelbrot")
    with Hook(DEV_WEBHOOK_SECRET) as hook, _embedder(stack):
        parked = _event(video_id, hook.url)
        stale = _event(video_id, hook.url)
        with stack.session() as s:
            for event, received in ((parked, utcnow()), (stale, utcnow() - timedelta(hours=2))):
                s.add(
                    Event(
                        event_id=event["event_id"],
                        payload=event,
                        video_id=video_id,
                        k=2,
                        callback_url=hook.url,
                        status="embedding",
                        received_at=received,
                    )
                )
        ids = {parked["event_id"], stale["event_id"]}
        got = hook.wait_delivered(ids, timeout_s=90)
    assert ids <= got.keys(), stack.log("server")[-3000:]
    answered = got[parked["event_id"]][0].payload
    assert answered["error"] is None and answered["query"]["video_id"] == video_id, answered
    late = got[stale["event_id"]][0].payload
    assert late["results"] == [] and "not answered within" in late["error"], late
