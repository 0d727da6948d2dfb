"""Activating a new model: the old model and index keep serving until the library is
embedded with the new one and its index is built; then both switch at once."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from support.media import make_video

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
    files = [make_video(folder / f"{p}.mp4", seconds=2, pattern=p) for p in ("testsrc2", "mandelbrot", "rgbtestsrc")]
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
