"""The encoder as training sees it: frozen parts, both views in one forward, wrapped for
DDP; and, once trained, its library normalisation fitted on the training videos."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.learn.encoder import VideoEncoder
from app.learn.train.config import TrainConfig
from app.learn.train.distributed import Ranks

logger = logging.getLogger(__name__)


class TwinForward(nn.Module):
    """Both views in one ``forward`` (as DDP wants one forward per backward), each through
    the encoder on its own, so batch norms see one view's batch at a time (as in
    facebookresearch/barlowtwins). With ``frames``, each view's per-frame descriptors
    come from the same backbone pass as its video embedding."""

    def __init__(self, encoder: VideoEncoder, *, frames: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.frames = frames

    def forward(self, views: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # views: (B, 2, T, 3, S, S); mask: (B, 2, T) -> two (B, embed_dim) [, two (B, T, frame_dim)]
        if not self.frames:
            return self.encoder(views[:, 0], mask[:, 0]), self.encoder(views[:, 1], mask[:, 1])
        out: list[torch.Tensor] = []
        for v in range(2):
            feats = self.encoder.frame_features(views[:, v])  # (B, T, D)
            out.insert(v, self.encoder.projector(self.encoder.temporal(feats, mask[:, v])))
            out.append(self.encoder.frame_head(feats))  # (B, T, frame_dim)
        return tuple(out)


def prepare_for_training(encoder: VideoEncoder, config: TrainConfig, ranks: Ranks, device: torch.device) -> nn.Module:
    """Moves ``encoder`` to ``device`` in training mode, freezes what ``config`` keeps as
    initialised, and returns the module to train: a :class:`TwinForward` over it, in DDP
    when there are several ranks. Make the optimiser after this (the projector's batch
    norms may have been replaced)."""
    encoder.train().to(device)
    encoder.backbone.to(memory_format=torch.channels_last)
    if config.freeze_backbone_bn_stats:
        for module in encoder.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    for module in backbone_stages(encoder.backbone)[: config.freeze_backbone_stages]:
        module.requires_grad_(False)
    if ranks.enabled and device.type == "cuda":
        # The projector's batch norms normalise per batch of videos: make that the global
        # batch, as the loss does. (SyncBatchNorm needs GPUs; the backbone's batch norms
        # see B*T frames per rank, plenty for their statistics.)
        encoder.projector = nn.SyncBatchNorm.convert_sync_batchnorm(encoder.projector)
    if config.frame_weight <= 0:  # untrained: DDP must not wait for its gradients
        encoder.frame_head.requires_grad_(False)
    twin: nn.Module = TwinForward(encoder, frames=config.frame_weight > 0)
    if ranks.enabled:
        from torch.nn.parallel import DistributedDataParallel

        twin = DistributedDataParallel(twin, device_ids=[ranks.local_rank] if device.type == "cuda" else None)
    return twin


def backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """A ResNet's stages in order: the stem (conv1, bn1), then layer1..layer4."""
    stem = [getattr(backbone, n) for n in ("conv1", "bn1") if hasattr(backbone, n)]
    layers = [getattr(backbone, f"layer{i}") for i in range(1, 5) if hasattr(backbone, f"layer{i}")]
    return [nn.ModuleList(stem), *layers]


def fit_library_norm(encoder: VideoEncoder, videos: Sequence[Path], *, limit: int, seed: int) -> None:
    """Fits ``encoder``'s library normalisation on up to ``limit`` of ``videos`` (a seeded
    sample), each decoded at 1 frame/s as serving does; undecodable ones are left out."""
    from app.media import video as video_io

    t0 = time.perf_counter()
    chosen = list(videos)
    if len(chosen) > limit:
        rng = np.random.default_rng(seed)
        chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), limit, replace=False))]
    clips = []
    for path in chosen:
        try:
            clips.append(video_io.sample_frames(path, fps=1.0, size=encoder.config.frame_size, max_frames=64).frames)
        except video_io.VideoError as exc:
            logger.debug("centre: leaving out %s: %s", path, exc.reason)
    device = encoder.centre.device
    encoder.cpu()
    encoder.fit_library_norm(clips)
    encoder.to(device)
    logger.info("library normalisation (%s) fitted on %d videos in %.1f s",
                encoder.config.library_norm, len(clips), time.perf_counter() - t0)  # fmt: skip
