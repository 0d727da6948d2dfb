"""A run's checkpoints: where a run starts (resumed, from given weights, or afresh), the
resumable state written every ``checkpoint_every`` steps, and the final weights.

``out_dir`` holds ``last.pt`` (resumable state: weights, optimiser, step, position in
the stream of windows, what the run's summary is made of) and ``model-step<N>.pt`` (the
final weights, what the registry points to). Both carry the run's :class:`TrainConfig`;
serving loads the encoder alone (:func:`app.learn.encoder.load_checkpoint`)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.learn.encoder import VideoEncoder, load_checkpoint, save_checkpoint
from app.learn.train.config import TrainConfig

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"


@dataclass(frozen=True)
class Start:
    """Where a run starts."""

    encoder: VideoEncoder
    config: TrainConfig  # the run's config, with the encoder's architecture
    state: dict[str, Any] | None  # last.pt's payload when resuming, else None


def starting_point(config: TrainConfig, out_dir: Path, *, resume: bool, init_checkpoint: Path | None) -> Start:
    """The encoder a run in ``out_dir`` starts from: ``last.pt`` when resuming, else the
    weights of ``init_checkpoint`` (its architecture replaces ``config.encoder``'s), else
    fresh weights seeded by ``config.seed``. A run already in ``out_dir`` is never
    overwritten: without ``resume`` it is refused."""
    last_path = out_dir / LAST_CHECKPOINT
    if resume and last_path.exists():
        encoder, state = load_checkpoint(last_path)
        if encoder.config != config.encoder and init_checkpoint is None:
            raise ValueError(f"{last_path} holds a {encoder.config} encoder; the config asks for {config.encoder}")
        logger.info("resuming %s at step %d", last_path, state["step"])
        return Start(encoder, dataclasses.replace(config, encoder=encoder.config), state)
    if last_path.exists() and not resume:
        raise FileExistsError(f"{out_dir} already holds a run ({LAST_CHECKPOINT}): resume it or use another out_dir")
    if init_checkpoint is not None:
        encoder, payload = load_checkpoint(init_checkpoint)
        logger.info("initialised from %s (step %s)", init_checkpoint, payload.get("step"))
        return Start(encoder, dataclasses.replace(config, encoder=encoder.config), None)
    with torch.random.fork_rng(devices=[]):
        # The same initial weights on every rank; seed 0 gives initial_encoder()'s.
        torch.manual_seed(config.seed)
        encoder = VideoEncoder(config.encoder)
    return Start(encoder, config, None)


def save_state(
    path: Path,
    encoder: VideoEncoder,
    optimizer: torch.optim.Optimizer,
    *,
    config: TrainConfig,
    step: int,
    position: int,
    items_per_epoch: int,
    clips: int,
    skipped: dict[str, str],
    recent: list[dict[str, float]],
    timed: tuple[int, float],
) -> None:
    """Writes the resumable state (``last.pt``): a resumed run continues from ``step``, at
    ``position`` in this rank's stream of windows. ``recent`` (the last steps' metrics)
    and ``timed`` (clips and seconds of the timed steps) carry the run's summary across
    pieces, so a run trained in pieces ends with the summary of an uninterrupted one."""
    save_checkpoint(
        path,
        encoder,
        extra={
            "train_config": config.to_dict(),
            "step": step,
            "epoch": position / items_per_epoch,
            "position": position,
            "clips": clips,
            "optimizer": optimizer.state_dict(),
            "skipped": skipped,
            "recent": recent,
            "timed_clips": timed[0],
            "timed_s": timed[1],
        },
    )


def final_path(out_dir: Path, step: int) -> Path:
    """Where the final weights of a run that ended at ``step`` go."""
    return out_dir / f"model-step{step:06d}.pt"


def save_final(
    path: Path,
    encoder: VideoEncoder,
    *,
    config: TrainConfig,
    step: int,
    epoch: float,
    clips: int,
    metrics: dict[str, float],
    init_checkpoint: Path | None,
) -> None:
    """Writes the final weights, with the run's config and a summary of how it ended."""
    save_checkpoint(
        path,
        encoder,
        extra={
            "train_config": config.to_dict(),
            "step": step,
            "epoch": epoch,
            "clips": clips,
            "metrics": metrics,
            "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
        },
    )
