"""A model's life: train (or fine-tune) -> register a version -> roll it out (embed the
library with it, build its index) -> serve. Shared by the CLI, the Celery tasks and the
demo; nothing here imports Celery.

A rollout is the same whichever process drives it: :func:`start_rollout` marks the model
warming, the library gets embedded with it (by workers, or here in :func:`roll_out_here`),
and :func:`finish_if_embedded` builds its index and switches serving to both once nothing
is left to embed. With workers, :func:`advance` is each step (the activation's first, then
beat's ``vidsim.advance_rollouts``): it asks workers for every video still missing that
nobody was asked for (added since, failed and still to retry, or, with ``resend_stale``,
asked for so long ago that the message must be lost), skips those given up
(:mod:`app.serve.embedding_jobs`), and says in the log why the rollout waits."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.index import rebuild
from app.learn import registry
from app.models import Embedding, IndexVersion, ModelVersion, Video, utcnow
from app.serve import embedding_jobs, recommend

if TYPE_CHECKING:
    from app.learn.train.config import TrainConfig

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


def training_config(
    preset: str, *, overrides: dict[str, Any] | None = None, finetune_epochs: int | None = None
) -> TrainConfig:
    """The config of a run: ``preset`` with ``overrides``; for a fine-tune,
    ``finetune_epochs`` passes over the videos instead of the preset's budget."""
    from app.learn.train.config import TrainConfig
    from app.learn.train.loop import finetune_config

    config = TrainConfig.preset(preset, **(overrides or {}))
    return finetune_config(config, finetune_epochs) if finetune_epochs is not None else config


def run_name(*, preset: str, init_model_id: int | None, suffix: str) -> str:
    """The default name of a run (and of its model version)."""
    return f"{'finetune' if init_model_id else 'pretrain'}-{preset}-{suffix}"


def run_dir(name: str, *, settings: Settings) -> Path:
    """Where run ``name`` keeps its checkpoints and curves."""
    return settings.checkpoint_dir.resolve() / name


def parent_checkpoint(*, session: Session, model_id: int) -> Path:
    """The weights a fine-tune of model ``model_id`` starts from."""
    parent = session.get_one(ModelVersion, model_id)
    if parent.checkpoint_path is None:
        raise ValueError(f"model {parent.id} ({parent.name}) is untrained: pre-train one first")
    return Path(parent.checkpoint_path)


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
    """Trains (pre-training, or fine-tuning from ``init_model_id``) in this process, in one
    go, registers the result as a model version and returns its id. The version is not
    active until rolled out. Training takes minutes to days, so no transaction is held
    across it: the parent is read in one, the result recorded in another. (Workers train
    in chunks instead: :mod:`app.learn.runs`.)"""
    from app.learn.train.loop import train

    if not videos:
        raise ValueError("no training videos: add library videos or crawl sources first")
    config = training_config(preset, overrides=overrides, finetune_epochs=(epochs or 5) if init_model_id else None)
    name = name or run_name(preset=preset, init_model_id=init_model_id, suffix=time.strftime("%Y%m%d-%H%M%S"))
    init = None
    if init_model_id is not None:
        with session_scope() as session:
            init = parent_checkpoint(session=session, model_id=init_model_id)
    result = train(config, videos, out_dir=run_dir(name, settings=settings), resume=resume, init_checkpoint=init,
                   progress=progress)  # fmt: skip
    with session_scope() as session:
        model = registry.register_trained(session=session, result=result, name=name, parent_id=init_model_id)
        model_id = model.id
    logger.info("registered model %d %s (%s)", model_id, name, result.checkpoint)
    return model_id


class RolloutFailed(ValueError):
    """The model could embed none of the library: it must not serve."""


def start_rollout(*, session: Session, model_id: int) -> ModelVersion:
    """Marks a model to take over (:func:`app.learn.registry.start_rollout`) and gives
    every library video its attempts with it again: activating a model anew after fixing
    what made its embeddings fail retries them."""
    model = registry.start_rollout(session=session, model_id=model_id)
    embedding_jobs.forget(model_id, session=session)
    return model


def finish_if_embedded(*, session: Session, model_id: int, settings: Settings) -> IndexVersion | None:
    """The end of a rollout: when the library is embedded with warming model ``model_id``
    (but for the videos given up for it), builds its index and switches serving to both
    in this transaction, and returns the index version; None while videos are still to
    embed (the active model keeps serving). Raises :class:`RolloutFailed` when every
    library video was given up."""
    if recommend.videos_to_embed(session=session, model_id=model_id, limit=1):
        return None
    failed = embedding_jobs.given_up_in_library(model_id, session=session)
    if failed.count and not _embedded(session, model_id):
        raise RolloutFailed(
            f"model {model_id} could embed none of the library ({failed.count} videos given up; "
            f"last error: {failed.last_error}); fix it and activate it again"
        )
    model = session.get_one(ModelVersion, model_id)
    version = rebuild.rebuild_index(session=session, model=model, settings=settings)
    registry.finish_rollout(session=session, model=model)
    if failed.count:
        logger.warning("model %d serves without the %d library videos it could not embed (last error: %s)",
                       model_id, failed.count, failed.last_error)  # fmt: skip
    return version


def _embedded(session: Session, model_id: int) -> int:
    """Enabled library videos embedded by the model."""
    stmt = select(func.count()).select_from(Embedding).join(Video)
    return session.scalar(stmt.where(Embedding.model_version_id == model_id, Video.in_library, Video.enabled)) or 0


@dataclass(frozen=True)
class Step:
    """One step of a rollout: the videos to ask workers to embed once the caller has
    committed, or the index version it switched to."""

    model_id: int
    enqueue: list[int]
    index: IndexVersion | None = None


def advance(*, session: Session, model_id: int, settings: Settings, resend_stale: bool) -> Step:
    """One step of warming model ``model_id``'s rollout: switches when the library is
    embedded (:func:`finish_if_embedded`); otherwise records which missing videos to ask
    for now and logs why the rollout waits. ``resend_stale``: the caller saw nothing
    waiting in the embed queue, so requests older than ``embed_requeue_after_s`` are lost
    (or running) and are sent again."""
    missing = recommend.videos_to_embed(session=session, model_id=model_id)
    if not missing:
        try:
            return Step(model_id, [], finish_if_embedded(session=session, model_id=model_id, settings=settings))
        except RolloutFailed as exc:
            logger.error("rollout of model %d cannot finish: %s", model_id, exc)
            return Step(model_id, [])
    stale_before = utcnow() - timedelta(seconds=settings.embed_requeue_after_s) if resend_stale else None
    todo = embedding_jobs.to_request(model_id, missing, session=session, stale_before=stale_before)
    embedding_jobs.mark_requested(todo, model_id, session=session)
    failed = embedding_jobs.given_up_in_library(model_id, session=session)
    logger.info("rollout of model %d waits for %d library videos to be embedded (%d asked for now, %d already "
                "asked for: queued or running); %d given up and skipped", model_id, len(missing), len(todo),
                len(missing) - len(todo), failed.count)  # fmt: skip
    return Step(model_id, todo)


@dataclass(frozen=True)
class Progress:
    """Where a rollout stands (`vidsim status`)."""

    model_id: int
    name: str
    embedded: int  # enabled library videos embedded with the model
    to_embed: int  # still to embed (asked for, or to ask for at the next step)
    given_up: embedding_jobs.GivenUp  # failed for good: skipped


def progress(*, session: Session, model_id: int) -> Progress:
    """Where warming model ``model_id``'s rollout stands."""
    model = session.get_one(ModelVersion, model_id)
    return Progress(
        model_id=model_id,
        name=model.name,
        embedded=_embedded(session, model_id),
        to_embed=len(recommend.videos_to_embed(session=session, model_id=model_id)),
        given_up=embedding_jobs.given_up_in_library(model_id, session=session),
    )


def roll_out_here(model_id: int, *, settings: Settings, progress: Callable[[int, int], None] | None = None) -> int:
    """Rolls a model out in this process (no worker): embeds the library with it, builds
    its index and switches serving to both at once. Returns the index version id.
    ``progress(done, total)`` is called after each video embedded."""
    with session_scope() as session:
        start_rollout(session=session, model_id=model_id)
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
