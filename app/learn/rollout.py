"""A model's life: train (or fine-tune) -> register a version -> roll it out (embed the
library with it, build its index) -> serve. Shared by the CLI, the Celery tasks and the
demo; nothing here imports Celery."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.index import search
from app.learn import registry
from app.models import ModelVersion, Video
from app.serve import recommend

logger = logging.getLogger(__name__)


def library_files(*, limit: int | None = None) -> list[Path]:
    """Local files of the enabled, usable library videos (fine-tuning data)."""
    with session_scope() as session:
        stmt = select(Video.local_path).where(
            Video.in_library, Video.enabled, Video.status != "failed", Video.local_path.is_not(None)
        )
        paths = [Path(p) for p in session.scalars(stmt.order_by(Video.id).limit(limit)) if p]
    return [p for p in paths if p.is_file()]


def training_files() -> list[Path]:
    """Pre-training data: the crawler's clean files when there are any, else the library."""
    try:
        from app.crawl.pipeline import training_files as crawled
    except ImportError:
        crawled = None
    if crawled is not None:
        with session_scope() as session:
            files = [Path(p) for p in crawled(session)]
        if files:
            return files
    return library_files()


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
    a model version and returns its id. The version is not active until rolled out."""
    from app.learn.train import TrainConfig, finetune, register_trained, train

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
        model = register_trained(session, result, name=name, parent_id=init_model_id)
        model_id = model.id
    logger.info("registered model %d %s (%s)", model_id, name, result.checkpoint)
    return model_id


def roll_out_here(model_id: int, *, settings: Settings, progress: Callable[[int, int], None] | None = None) -> int:
    """Rolls a model out in this process (no worker): embeds the library with it, builds
    its index and switches serving to both at once. Returns the index version id."""
    with session_scope() as session:
        registry.start_rollout(session, model_id)
        todo = recommend.videos_to_embed(session=session, model_id=model_id)
    for done, video_id in enumerate(todo, start=1):
        with session_scope() as session:
            recommend.embed_video(video_id, session=session, settings=settings, model_id=model_id)
        if progress:
            progress(done, len(todo))
    with session_scope() as session:
        model = session.get_one(ModelVersion, model_id)
        version = search.rebuild_index(session, model, settings=settings)
        registry.finish_rollout(session, model)
        return version.id
