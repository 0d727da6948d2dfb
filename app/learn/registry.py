"""Model versions: recording trained ones, which one is active (and which are warming up
to take over), and loading an encoder once per process.

The functions that touch the database take ``session`` keyword-only and never commit:
the caller owns the transaction."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.learn.device import cpu_has_bf16, serving_device, torch_threads
from app.learn.encoder import INITIAL_CONFIG, EncoderConfig, VideoEncoder, initial_encoder, load_checkpoint
from app.models import ModelVersion

if TYPE_CHECKING:
    from app.learn.train.loop import TrainResult

logger = logging.getLogger(__name__)

# app.learn.encoder.INITIAL_CONFIG: 64 px since the frame size was measured, thumbnails in
# its frame descriptors since they were, matched under mirror images since that was, and
# in its served vectors since a library of hundreds was. An install that already serves
# an earlier one ("init-resnet18-seed0" at 224 px, "init-resnet18-64px-seed0",
# "init-resnet18-64px-thumb16-seed0", "init-resnet18-64px-thumb16fold-seed0",
# "init-resnet18-64px-thumb16mirrors-seed0") keeps serving it.
INITIAL_MODEL_NAME = "init-resnet18-64px-thumb16mirrors-vthumb-seed0"


def active_model(*, session: Session) -> ModelVersion:
    """The active model version; on a fresh install, a deterministic untrained one."""
    model = session.scalar(select(ModelVersion).where(ModelVersion.is_active))
    if model is not None:
        return model
    try:
        with session.begin_nested():  # several workers may start on a fresh install at once
            initial = session.scalar(select(ModelVersion).where(ModelVersion.name == INITIAL_MODEL_NAME))
            if initial is None:
                config = INITIAL_CONFIG
                initial = ModelVersion(
                    name=INITIAL_MODEL_NAME,
                    config=config.to_dict(),
                    checkpoint_path=None,
                    dim=config.output_dim,
                    trained=False,
                    data_summary={"note": "untrained: deterministic initialisation (seed 0)"},
                )
                session.add(initial)
                session.flush()
            activate(session=session, model_id=initial.id)
    except IntegrityError:
        return session.scalars(select(ModelVersion).where(ModelVersion.is_active)).one()
    logger.warning(
        "no trained encoder is active: serving the untrained %s (train one with `vidsim train`)",
        INITIAL_MODEL_NAME,
    )
    return initial


def activate(*, session: Session, model_id: int) -> ModelVersion:
    """Makes ``model_id`` the one active version."""
    session.execute(update(ModelVersion).where(ModelVersion.is_active).values(is_active=False, status="retired"))
    session.flush()
    model = session.get_one(ModelVersion, model_id)
    model.is_active, model.status = True, "active"
    session.flush()
    return model


def register_model(
    *,
    session: Session,
    name: str,
    checkpoint_path: Path,
    config: EncoderConfig,
    parent_id: int | None = None,
    data_summary: dict | None = None,
    metrics: dict | None = None,
) -> ModelVersion:
    """Records a trained checkpoint as a (not yet active) model version."""
    model = ModelVersion(
        name=name,
        config=config.to_dict(),
        checkpoint_path=str(checkpoint_path),
        dim=config.output_dim,
        trained=True,
        parent_id=parent_id,
        data_summary=data_summary or {},
        metrics=metrics or {},
    )
    session.add(model)
    session.flush()
    return model


def register_trained(*, session: Session, result: TrainResult, name: str, parent_id: int | None = None) -> ModelVersion:
    """Records a training run's final checkpoint as a (not yet active) model version, with
    what it was trained on and how it ended. The version serves once it is rolled out."""
    return register_model(
        session=session,
        name=name,
        checkpoint_path=result.checkpoint,
        config=result.config.encoder,
        parent_id=parent_id,
        data_summary={
            "videos": result.videos,
            "clips": result.clips,
            "steps": result.steps,
            "epochs": round(result.epochs, 3),
            "skipped_videos": len(result.skipped),
            "init_checkpoint": str(result.init_checkpoint) if result.init_checkpoint else None,
            "train_config": result.config.to_dict(),
        },
        metrics={**result.final_metrics, "clips_per_s": round(result.clips_per_s, 3)},
    )


def encoder_for(model: ModelVersion) -> VideoEncoder:
    """The encoder of a model version, loaded once per process."""
    return _load(model.id, model.checkpoint_path, json.dumps(model.config, sort_keys=True))


@functools.lru_cache(maxsize=2)
def _load(model_id: int, checkpoint_path: str | None, config_json: str) -> VideoEncoder:
    encoder = _read(model_id, checkpoint_path, json.loads(config_json)).to(serving_device())
    logger.info("loaded encoder for model %d (%s)", model_id, checkpoint_path or "untrained")
    return encoder


def load_encoder(model: ModelVersion) -> VideoEncoder:
    """A fresh copy of a model version's encoder, on the CPU (not the one serving uses)."""
    return _read(model.id, model.checkpoint_path, model.config)


def _read(model_id: int, checkpoint_path: str | None, config_dict: dict) -> VideoEncoder:
    config = EncoderConfig.from_dict(config_dict)
    if checkpoint_path is None:
        encoder = initial_encoder(config)
    else:
        encoder, _ = load_checkpoint(Path(checkpoint_path))
    if encoder.config.output_dim != config.output_dim:
        raise ValueError(
            f"model {model_id}: checkpoint gives {encoder.config.output_dim}-d vectors, "
            f"registry says {config.output_dim}"
        )
    return encoder


def embed_clips(model: ModelVersion, clips: list[np.ndarray]) -> np.ndarray:
    """(N, dim) float32 L2-normalised vectors, one forward pass for all clips."""
    return encoder_for(model).embed(clips, bf16=cpu_has_bf16())


def describe_clips(model: ModelVersion, clips: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """:func:`embed_clips`'s vectors and each clip's (T_i, frame_dim) unit frame
    descriptors, from the same forward pass."""
    return encoder_for(model).describe(clips, bf16=cpu_has_bf16())


def describe_stream(
    model: ModelVersion, chunks: Iterable[np.ndarray], *, leave_a_core: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`describe_clips` of one clip whose frames arrive in chunks (a
    :class:`~app.media.video.FrameStream`): the backbone runs on each chunk while the
    decoder works on the next. Returns the (dim,) vector and the (T, frame_dim) unit
    frame descriptors.

    With ``leave_a_core``, the forward passes use one torch thread fewer than the
    process otherwise does (at least one), leaving the decoding child its core: on a
    few cores, a decoder and a forward pass that both want every core wait on each
    other (see the README's "Latency benchmark").
    """
    encoder = encoder_for(model)
    threads = max(1, torch.get_num_threads() - 1) if leave_a_core else None
    with torch_threads(threads):
        return encoder.describe_stream(chunks, bf16=cpu_has_bf16())


def start_rollout(*, session: Session, model_id: int) -> ModelVersion:
    """Marks a model to take over: the library gets embedded with it and an index built;
    the active model keeps serving until then (see :func:`finish_rollout`)."""
    model = session.get_one(ModelVersion, model_id)
    if not model.is_active:
        model.status = "warming"
    session.flush()
    return model


def warming_models(*, session: Session) -> list[ModelVersion]:
    """The models rolling out: their library is being embedded, their index not yet built."""
    return list(session.scalars(select(ModelVersion).where(ModelVersion.status == "warming")))


def finish_rollout(*, session: Session, model: ModelVersion) -> ModelVersion:
    """Switches serving to ``model``; call in the transaction that activates its index."""
    return activate(session=session, model_id=model.id)
