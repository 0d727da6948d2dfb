"""A model's life: train (or fine-tune) -> register a version -> roll it out (embed the
library with it, build its index) -> serve. Shared by the CLI, the Celery tasks and the
demo; nothing here imports Celery.

A rollout is the same whichever process drives it: :func:`app.learn.registry.start_rollout`
marks the model warming, the library gets embedded with it (by workers, or here in
:func:`roll_out_here`), and :func:`finish_if_embedded` builds its index and switches
serving to both once nothing is left to embed (the beat task ``vidsim.advance_rollouts``
asks it of every warming model)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.index import rebuild
from app.learn import registry
from app.models import IndexVersion, ModelVersion, Video
from app.serve import recommend

logger = logging.getLogger(__name__)


def library_files(*, session: Session, limit: int | None = None) -> list[Path]:
    """Local files of the enabled, usable library videos (fine-tuning data)."""
    stmt = select(Video.local_path).where(
        Video.in_library, Video.enabled, Video.status != "failed", Video.local_path.is_not(None)
    )
    paths = [Path(p) for p in session.scalars(stmt.order_by(Video.id).limit(limit)) if p]
    return [p for p in paths if p.is_file()]


def training_files(*, session: Session) -> list[Path]:
    """Pre-training data: the crawler's clean files when there are any, else the library."""
    try:
        from app.crawl.pipeline import training_files as crawled
    except ImportError:
        return library_files(session=session)
    files = [Path(p) for p in crawled(session)]
    return files or library_files(session=session)


def train_model(
    *,
    preset: str,
    videos: list[Path],
    settings: Settings,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    init_model_id: int | None = None,
    epochs: int | None = None,
    progress: bool = False,
) -> int:
    """Trains (pre-training, or fine-tuning from ``init_model_id``), registers the result as
    a model version and returns its id. The version is not active until rolled out.
    Training takes minutes to days, so no transaction is held across it: the parent is
    read in one, the result recorded in another."""
    from app.learn.train.config import TrainConfig
    from app.learn.train.loop import finetune, train

    if not videos:
        raise ValueError("no training videos: add library videos or crawl sources first")
    config = TrainConfig.preset(preset, **(overrides or {}))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "finetune" if init_model_id else "pretrain"
    name = name or f"{kind}-{preset}-{stamp}"
    out_dir = settings.checkpoint_dir.resolve() / name
    if init_model_id is not None:
        with session_scope() as session:
            parent = session.get_one(ModelVersion, init_model_id)
            if parent.checkpoint_path is None:
                raise ValueError(f"model {parent.id} ({parent.name}) is untrained: pre-train one first")
            init = Path(parent.checkpoint_path)
        result = finetune(
            config, videos, init_checkpoint=init, out_dir=out_dir, epochs=epochs or 5, resume=resume, progress=progress
        )
    else:
        result = train(config, videos, out_dir=out_dir, resume=resume, progress=progress)
    with session_scope() as session:
        model = registry.register_trained(session=session, result=result, name=name, parent_id=init_model_id)
        model_id = model.id
    logger.info("registered model %d %s (%s)", model_id, name, result.checkpoint)
    return model_id


def finish_if_embedded(*, session: Session, model_id: int, settings: Settings) -> IndexVersion | None:
    """The end of a rollout: when the library is embedded with warming model ``model_id``,
    builds its index and switches serving to both in this transaction, and returns the
    index version; None while videos are still to embed (the active model keeps serving)."""
    if recommend.videos_to_embed(session=session, model_id=model_id, limit=1):
        return None
    model = session.get_one(ModelVersion, model_id)
    version = rebuild.rebuild_index(session=session, model=model, settings=settings)
    registry.finish_rollout(session=session, model=model)
    return version


def roll_out_here(model_id: int, *, settings: Settings, progress: Callable[[int, int], None] | None = None) -> int:
    """Rolls a model out in this process (no worker): embeds the library with it, builds
    its index and switches serving to both at once. Returns the index version id.
    ``progress(done, total)`` is called after each video embedded."""
    with session_scope() as session:
        registry.start_rollout(session=session, model_id=model_id)
        todo = recommend.videos_to_embed(session=session, model_id=model_id)
    while True:
        for done, video_id in enumerate(todo, start=1):
            recommend.embed_video(video_id, sessions=session_scope, settings=settings, model_id=model_id)
            if progress:
                progress(done, len(todo))
        with session_scope() as session:
            version = finish_if_embedded(session=session, model_id=model_id, settings=settings)
            if version is not None:
                return version.id
            # Videos added to the library meanwhile: embedded in another pass. (Each pass
            # embeds or fails every video it is given, so the passes end.)
            todo = recommend.videos_to_embed(session=session, model_id=model_id)
