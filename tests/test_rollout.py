"""Activating a new model: the old model and index keep serving until the library is
embedded with the new one and its index is built; then both switch at once."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from support.media import make_video, own_hue

from app.db import session_scope
from app.index.rebuild import rebuild_index
from app.index.search import search_library, vector_of
from app.learn import registry
from app.learn.encoder import EncoderConfig, initial_encoder, save_checkpoint
from app.media.register import register
from app.models import IndexVersion, ModelVersion
from app.serve import recommend


def test_rollout_switches_model_and_index_together(data_dir: Path, settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from workers.tasks import advance_rollouts

    folder = data_dir / "rollout"
    files = [
        make_video(folder / f"{p}.mp4", seconds=2, pattern=p, extra_vf=own_hue())
        for p in ("testsrc2", "mandelbrot", "rgbtestsrc")
    ]
    with session_scope() as s:
        ids = [register(s, str(f), settings=settings, collection="rollout").video_id for f in files]
        old = registry.active_model(session=s)
    for video_id in ids:
        assert recommend.embed_video(video_id, sessions=session_scope, settings=settings).ok
    with session_scope() as s:
        rebuild_index(session=s, model=registry.active_model(session=s), settings=settings)

    config = EncoderConfig(frame_size=64, embed_dim=64, projector_hidden=64)
    checkpoint = save_checkpoint(tmp_path / "new.pt", initial_encoder(config, seed=1))
    with session_scope() as s:
        new = registry.register_model(
            session=s, name=f"test-new-{tmp_path.name}", checkpoint_path=checkpoint, config=config
        )
        registry.start_rollout(session=s, model_id=new.id)
        new_id = new.id

    # Warming: nothing embedded with the new model yet, so the old one keeps serving.
    assert advance_rollouts() == []
    with session_scope() as s:
        assert registry.active_model(session=s).id == old.id
        assert s.get_one(ModelVersion, new_id).status == "warming"

    with session_scope() as s:
        todo = recommend.videos_to_embed(session=s, model_id=new_id)
    assert set(ids) <= set(todo)
    for video_id in todo:
        recommend.embed_video(video_id, sessions=session_scope, settings=settings, model_id=new_id)

    assert advance_rollouts() == [new_id]
    with session_scope() as s:
        active = registry.active_model(session=s)
        index = s.scalars(select(IndexVersion).where(IndexVersion.is_active)).one()
        assert active.id == new_id and active.status == "active"
        assert index.model_version_id == new_id and index.dim == config.output_dim
        assert s.get_one(ModelVersion, old.id).status == "retired"
        # Serving uses the new model's vectors and index.
        from app.models import Embedding

        emb = s.scalars(
            select(Embedding).where(Embedding.video_id == ids[0], Embedding.model_version_id == new_id)
        ).one()
        matches, used = search_library(
            session=s, model=active, query=vector_of(emb), k=2, exclude={ids[0]}, collection="rollout"
        )
        assert used == index.id and len(matches) == 2

    with session_scope() as s:  # leave the shared test database as other tests expect it
        registry.activate(session=s, model_id=old.id)
        rebuild_index(session=s, model=s.get_one(ModelVersion, old.id), settings=settings)


def _new_model(tmp_path: Path, name: str) -> int:
    config = EncoderConfig(frame_size=64, embed_dim=64, projector_hidden=64)
    checkpoint = save_checkpoint(tmp_path / f"{name}.pt", initial_encoder(config, seed=2))
    with session_scope() as s:
        registry.active_model(session=s)
        return registry.register_model(session=s, name=f"{name}-{tmp_path.name}", checkpoint_path=checkpoint,
                                       config=config).id  # fmt: skip


def test_a_video_that_keeps_failing_is_given_up_and_the_rollout_finishes_without_it(
    data_dir: Path, settings, tmp_path: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    """Each step asks only for what nobody was asked for (or what failed and may be
    retried), says why it waits, and skips a video given up after
    VIDSIM_EMBED_MAX_ATTEMPTS failed tasks; an event for that video is then answered with
    the reason instead of asking for the embedding again."""
    import logging
    import subprocess
    import sys

    from app.learn import rollout
    from app.models import Recommendation

    files = [
        make_video(data_dir / "giveup" / f"{p}.mp4", seconds=2, pattern=p, extra_vf=own_hue())
        for p in ("testsrc2", "smptebars")
    ]
    with session_scope() as s:
        failing, fine = (register(s, str(f), settings=settings, collection="giveup").video_id for f in files)
        old = registry.active_model(session=s).id
    for video_id in (failing, fine):  # library videos the serving model has embedded, as in a real rollout
        assert recommend.embed_video(video_id, sessions=session_scope, settings=settings).ok
    new_id = _new_model(tmp_path, "giveup")
    with session_scope() as s:
        rollout.start_rollout(session=s, model_id=new_id)

    def step(resend_stale: bool = False) -> rollout.Step:
        with session_scope() as s:
            return rollout.advance(session=s, model_id=new_id, settings=settings, resend_stale=resend_stale)

    with caplog.at_level(logging.INFO, logger="app.learn.rollout"):
        first = step()
    assert {failing, fine} <= set(first.enqueue) and first.index is None
    assert f"rollout of model {new_id} waits for {len(first.enqueue)} library videos" in caplog.text
    assert step().enqueue == [] and step(resend_stale=True).enqueue == []  # asked for just now

    for attempt in range(1, settings.embed_max_attempts + 1):
        with session_scope() as s:
            recommend.embedding_failed(failing, "RuntimeError: boom", session=s, settings=settings, model_id=new_id)
        if attempt < settings.embed_max_attempts:
            assert step().enqueue == [failing]  # failed: asked for again
    assert failing not in step().enqueue

    with session_scope() as s:
        todo = recommend.videos_to_embed(session=s, model_id=new_id)
    assert failing not in todo
    # Asked before the last videos are embedded: until then nothing can finish the rollout,
    # not even the beat of a worker sharing this database (it asks for nothing asked for now).
    status = subprocess.run([sys.executable, "-m", "scripts.cli", "status"], capture_output=True, text=True,
                            timeout=300, env={**__import__("os").environ, "COLUMNS": "250"})  # fmt: skip
    assert f"{new_id} giveup-{tmp_path.name}:" in status.stdout, status
    assert f"{len(todo)} still to embed; 1 given up and skipped (last error: RuntimeError: boom)" in status.stdout
    for video_id in todo:
        assert recommend.embed_video(video_id, sessions=session_scope, settings=settings, model_id=new_id).ok

    try:
        step()  # switches serving, unless that beat switched it first
        with session_scope() as s:
            assert registry.active_model(session=s).id == new_id
            event = {
                "event_id": f"giveup-{tmp_path.name}",
                "video_id": failing,
                "callback_url": "http://127.0.0.1:9/hook",
            }
            outcome = recommend.accept_event(event, session=s, settings=settings, fallback_id="x")
            assert outcome.embed_video_id is None  # not asked for again
            rec = s.scalars(select(Recommendation).where(Recommendation.event_id == event["event_id"])).one()
        assert rec.error and rec.error.startswith(f"video {failing} could not be embedded with model giveup-")
        assert "RuntimeError: boom" in rec.error
    finally:
        with session_scope() as s:
            registry.activate(session=s, model_id=old)
            rebuild_index(session=s, model=s.get_one(ModelVersion, old), settings=settings)


def test_a_model_that_embeds_none_of_the_library_never_serves(settings, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    from app.learn import rollout

    new_id = _new_model(tmp_path, "broken")
    with session_scope() as s:
        old = registry.active_model(session=s).id
        rollout.start_rollout(session=s, model_id=new_id)
        todo = recommend.videos_to_embed(session=s, model_id=new_id)
        for video_id in todo:
            recommend.embedding_failed(video_id, "OSError: no GPU", session=s, settings=settings, model_id=new_id,
                                       final=True)  # fmt: skip
    try:
        with caplog.at_level(logging.ERROR, logger="app.learn.rollout"), session_scope() as s:
            step = rollout.advance(session=s, model_id=new_id, settings=settings, resend_stale=True)
        assert step.index is None and step.enqueue == []
        assert f"rollout of model {new_id} cannot finish: model {new_id} could embed none of the library" in caplog.text
        with session_scope() as s:
            assert registry.active_model(session=s).id == old
            # Activating it again (once fixed) gives every video its attempts again.
            rollout.start_rollout(session=s, model_id=new_id)
            assert recommend.videos_to_embed(session=s, model_id=new_id) == todo
    finally:
        with session_scope() as s:
            s.get_one(ModelVersion, new_id).status = "candidate"  # no longer warming
