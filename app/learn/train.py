"""Self-supervised pre-training and fine-tuning of the video encoder (Barlow Twins).

For each video, two random windows of ``frames / fps`` seconds are sampled at ``fps``
frames per second (decoded with decord inside the DataLoader's worker processes), each
augmented with one draw applied to all its frames (:mod:`app.learn.augment`); the encoder embeds
both and :mod:`app.learn.loss` pulls their cross-correlation towards the identity.

DDP-ready: under ``torchrun`` (``WORLD_SIZE > 1``) each rank loads its shard of the videos
(DistributedSampler), the loss is computed over the global batch (all-reduced statistics
and cross-correlation) and DDP averages the gradients. Mixed precision (bf16 autocast) on
GPU. ``out_dir`` holds ``last.pt`` (resumable state, written every ``checkpoint_every``
steps), ``model-step<N>.pt`` (the final weights, what the registry points to),
``metrics.jsonl`` and ``loss.png``.

Decoding runs in worker processes, never in the trainer: decord must not be imported
before torch nor share a reader across a fork (decord#251, #294). decord hard-crashes or
hangs on some corrupt files (FIELD-NOTES "Decoding"), so training data should be files
that passed the preprocessing probe (:func:`app.media.video.probe`); what still fails to decode
is skipped with a logged reason, and a worker that dies or hangs costs one batch (the
loader is rebuilt) up to ``max_loader_failures`` times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from app.files import atomic_path, write_atomic
from app.learn.augment import ClipAugment
from app.learn.encoder import EncoderConfig, VideoEncoder, load_checkpoint, save_checkpoint
from app.learn.loss import DEFAULT_LAMBD, barlow_twins_terms
from app.logs import one_line

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"

# Windows are decoded with the short side this much larger than frame_size, so that a
# random resized crop of 30% of the frame is not upsampled as much.
_DECODE_OVERSAMPLE = 1.25
# How many decord readers each loader worker keeps open (small libraries reuse them).
_READER_CACHE = 32


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    # Data: two windows of `frames` frames at `fps` per video (window = frames / fps s).
    frames: int = 32
    fps: float = 1.0
    # Videos shorter than a window: "shorter" samples a shorter window (padded by
    # repeating its last frame, masked out of the temporal pooling); "loop" wraps around.
    short_videos: Literal["shorter", "loop"] = "shorter"
    min_frames: int = 2  # fewer decodable frames than this: the video is skipped
    clips_per_video: int = 1  # window pairs per video per epoch
    # Augmentation (app.learn.augment; Barlow Twins' recipe at strength 1).
    crop_scale: tuple[float, float] = (0.3, 1.0)
    jitter_strength: float = 1.0  # scales (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1)
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)  # view 1, view 2
    solarize_p: tuple[float, float] = (0.0, 0.2)
    zoom_out_p: float = 0.0  # both views: the frame shrunk onto a plain canvas (app.learn.augment)
    # Objective.
    lambd: float = DEFAULT_LAMBD
    # Keep the backbone's batch-norm statistics as they are (the running ones, in eval
    # mode) instead of normalising by each batch's; the affine parameters still train.
    freeze_backbone_bn_stats: bool = False
    # Leading backbone stages kept as initialised: 0 none, 1 the stem (conv1, bn1), 2 the
    # stem and layer1, ... 5 the whole backbone. Early layers hold the low-level detail
    # that tells near-duplicate clips apart; a small library cannot retrain them.
    freeze_backbone_stages: int = 0
    # Optimisation. batch_size is global (all ranks together).
    batch_size: int = 512
    optimizer: Literal["lars", "adamw"] = "lars"
    lr: float = 0.4  # LARS: Barlow Twins' 0.2 per 256 clips; biases get lr * lr_bias_ratio
    lr_bias_ratio: float = 0.024  # Barlow Twins: 0.0048 / 0.2
    weight_decay: float = 1.5e-6
    warmup_fraction: float = 0.1  # of all steps, linear from 0; then cosine to lr * 0.001
    steps: int | None = None  # step budget; None: `epochs` over the videos
    epochs: int | None = 100
    grad_clip: float | None = None
    # bf16 autocast (weights and the loss stay float32). auto: on GPUs, and on CPUs with
    # native bf16 (1.5-2.5x faster training there); fp32 elsewhere.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Torch threads of the trainer (None: torch's default). On a few shared cores, fewer
    # threads than cores leaves room for the loader workers; oversubscribed OpenMP threads
    # wait on each other and run many times slower.
    torch_threads: int | None = None
    # Loading and bookkeeping.
    num_workers: int = 8  # per rank
    prefetch_factor: int = 4
    loader_timeout_s: float = 600.0  # a worker silent this long is presumed hung
    max_loader_failures: int = 3
    checkpoint_every: int = 500
    seed: int = 0
    # After training, fit the encoder's library normalisation (EncoderConfig.library_norm)
    # on up to norm_videos of the training videos, decoded as serving decodes them: a
    # fine-tune on the company's library normalises by that library.
    norm_videos: int = 2048

    @property
    def window_s(self) -> float:
        return self.frames / self.fps

    def augmenters(self) -> tuple[ClipAugment, ClipAugment]:
        s = self.jitter_strength
        common: dict[str, Any] = {
            "scale": self.crop_scale,
            "brightness": 0.4 * s,
            "contrast": 0.4 * s,
            "saturation": 0.2 * s,
            "hue": min(0.5, 0.1 * s),
            "grayscale_p": self.grayscale_p,
            "zoom_out_p": self.zoom_out_p,
        }
        size = self.encoder.frame_size
        return (
            ClipAugment(size, blur_p=self.blur_p[0], solarize_p=self.solarize_p[0], **common),
            ClipAugment(size, blur_p=self.blur_p[1], solarize_p=self.solarize_p[1], **common),
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["encoder"] = self.encoder.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "encoder" in values:
            values["encoder"] = EncoderConfig.from_dict(values["encoder"])
        for name in ("crop_scale", "blur_p", "solarize_p"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named preset (see :data:`PRESETS`) with ``overrides`` applied."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
        return dataclasses.replace(base, **overrides)


PRESETS: dict[str, TrainConfig] = {
    # The specification: 32 frames at 1 fps, 224 px, global batch 512, 4096-d projector,
    # lambda 0.001, LARS, bf16 on GPU; run with torchrun across GPUs.
    "full": TrainConfig(
        encoder=EncoderConfig(backbone="resnet18", frame_size=224, embed_dim=4096, projector_hidden=4096),
        frames=32,
        batch_size=512,
        optimizer="lars",
        lr=0.4,
        epochs=100,
        num_workers=8,
        prefetch_factor=4,
        checkpoint_every=500,
    ),
    # Minutes on 2 CPU cores: 64 px, 4 frames a window, 300 steps of 16 clips (0.6-2 s a
    # step on a shared 2-core machine). Measured on the retrieval benchmark (README), as a
    # fine-tune on a small library from the initial weights: the backbone keeps its
    # initial batch-norm statistics and its stem, layer1 and layer2 (a small library
    # cannot retrain the low-level filters that tell near-duplicates apart; training them
    # cost recall), a low learning rate (3e-4 destroyed the initial features faster than
    # it learned), a 256-d projector (batch 16 cannot estimate a 1024-d correlation
    # matrix), crops keeping at least half the frame, a zoom-out now and then; served
    # vectors are centred and whitened by the library's statistics.
    "cpu-small": TrainConfig(
        encoder=EncoderConfig(
            backbone="resnet18", frame_size=64, embed_dim=256, projector_hidden=1024, library_norm="centre+whiten"
        ),
        frames=4,
        crop_scale=(0.5, 1.0),
        zoom_out_p=0.3,
        freeze_backbone_bn_stats=True,
        freeze_backbone_stages=3,
        batch_size=16,
        optimizer="adamw",
        lr=1e-4,
        weight_decay=1e-4,
        warmup_fraction=0.1,
        steps=300,
        epochs=None,
        num_workers=1,
        prefetch_factor=2,
        loader_timeout_s=300.0,
        checkpoint_every=25,
        torch_threads=max(1, (os.cpu_count() or 2) - 1),  # a core for the loader worker
    ),
}


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class SkippedVideo(Exception):
    """A video that cannot give a training sample; ``reason`` is logged."""


@dataclass
class _Reader:
    vr: Any  # decord.VideoReader, opened in this worker
    starts: np.ndarray  # (N,) frame start times, seconds from the first frame
    order: np.ndarray  # (N,) frame indices sorted by start time
    end_s: float  # the end of the last frame


class WindowDataset(Dataset):
    """Pairs of augmented windows, one pair per (video, draw).

    Keys are ``(item, seed)`` tuples (from :class:`EpochSampler`; the seed makes the
    window positions and augmentations reproducible) or plain ints (fresh randomness).
    ``item % len(videos)`` picks the video. A sample is a dict:

    - ``views``: (2, T, 3, S, S) float32 in [0, 1], S = the augmenters' frame_size;
    - ``mask``: (2, T) bool, True for real frames (a short video's window is padded);
    - ``video``: the index of the video used (another one when ``item``'s failed);
    - ``skipped``: [(path, reason)] of videos that failed while making this sample.

    A video that cannot be decoded is skipped with its reason and another (random) video
    stands in, so batches stay full; ``views`` is None if ``max_attempts`` all failed.
    decord is imported and readers are opened lazily, in the process that reads.
    """

    def __init__(
        self,
        videos: Sequence[Path | str],
        *,
        frames: int,
        fps: float,
        augment: tuple[ClipAugment, ClipAugment],
        short_videos: Literal["shorter", "loop"] = "shorter",
        min_frames: int = 2,
        clips_per_video: int = 1,
        max_attempts: int = 4,
    ) -> None:
        if not videos:
            raise ValueError("no videos to train on")
        if frames < 1 or min_frames < 1:
            raise ValueError("frames and min_frames must be >= 1")
        self.videos = [str(v) for v in videos]
        self.frames = frames
        self.fps = fps
        self.augment = augment
        self.frame_size = augment[0].frame_size  # S of the views (and what decoding aims at)
        self.short_videos = short_videos
        self.min_frames = min(min_frames, frames)
        self.clips_per_video = clips_per_video
        self.max_attempts = max_attempts
        self._readers: OrderedDict[str, _Reader] = OrderedDict()
        self._bad: dict[str, str] = {}  # path -> reason, per process

    def __len__(self) -> int:
        return len(self.videos) * self.clips_per_video

    def __getstate__(self) -> dict[str, Any]:
        # Readers never cross a process boundary (decord#294): workers open their own.
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()
        return state

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        item, seed = key if isinstance(key, tuple) else (key, None)
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        index = item % len(self.videos)
        skipped: list[tuple[str, str]] = []
        for _ in range(self.max_attempts):
            path = self.videos[index]
            try:
                if path in self._bad:
                    raise SkippedVideo(self._bad[path])
                views, mask = self._sample(path, gen)
                return {"views": views, "mask": mask, "video": index, "skipped": skipped}
            except SkippedVideo as exc:
                reason = str(exc)
                if path not in self._bad:
                    self._bad[path] = reason
                    skipped.append((path, reason))
                    logger.debug("skipping %s: %s", path, reason)  # the trainer logs it once
            index = int(torch.randint(len(self.videos), (), generator=gen))
        return {"views": None, "mask": None, "video": -1, "skipped": skipped}

    def _sample(self, path: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        reader = self._reader(path)
        t = self.frames
        times, valid = zip(*(self._window_times(reader, gen) for _ in range(2)), strict=True)
        # The frame shown at each target time: the last one starting at or before it.
        pos = np.searchsorted(reader.starts[reader.order], np.concatenate(times) + 1e-3, side="right") - 1
        indices = reader.order[np.clip(pos, 0, len(reader.order) - 1)]  # (2T,)
        # Decode each distinct frame once, in file order, for both windows together.
        unique, inverse = np.unique(indices, return_inverse=True)
        try:
            batch = reader.vr.get_batch(unique.tolist()).asnumpy()  # (U, h, w, 3) uint8
        except Exception as exc:  # decord: RuntimeError or DECORDError (not a RuntimeError)
            self._drop_reader(path)
            raise SkippedVideo(f"cannot decode frames: {one_line(exc)}") from None
        if batch.ndim != 4 or batch.shape[0] != len(unique) or batch.shape[-1] != 3:
            raise SkippedVideo(f"decoder returned frames of shape {batch.shape}")
        clip = torch.from_numpy(batch[inverse.reshape(-1)]).permute(0, 3, 1, 2)  # (2T, 3, h, w)
        views, masks = [], []
        for v, augment in enumerate(self.augment):
            views.append(augment(clip[v * t : (v + 1) * t], generator=gen))  # (T, 3, S, S)
            mask = torch.zeros(t, dtype=torch.bool)
            mask[: valid[v]] = True
            masks.append(mask)
        return torch.stack(views), torch.stack(masks)  # (2, T, 3, S, S), (2, T)

    def _window_times(self, reader: _Reader, gen: torch.Generator) -> tuple[np.ndarray, int]:
        """Target times (T,) of one window, and how many of them are real frames."""
        t, period, end = self.frames, 1.0 / self.fps, reader.end_s

        def uniform(hi: float) -> float:
            return max(0.0, hi) * float(torch.rand((), generator=gen))

        if end >= t * period:  # the window fits: a random start
            return uniform(end - t * period) + np.arange(t) * period, t
        if self.short_videos == "loop":  # wrap around the video
            return (uniform(end) + np.arange(t) * period) % end, t
        # A shorter window: as many frames at `fps` as the video holds...
        n = min(t, max(1, math.ceil(end * self.fps - 1e-6)))
        step = period
        if n < self.min_frames:  # ...but at least min_frames, spaced more densely
            n = self.min_frames
            step = end / n
        times = uniform(end - (n - 1) * step - 1e-3) + np.arange(n) * step
        # Pad by repeating the last frame: padded frames still go through the backbone's
        # batch norm in training, and a real frame disturbs its statistics least.
        return np.concatenate([times, np.full(t - n, times[-1])]), n

    def _reader(self, path: str) -> _Reader:
        if path in self._readers:
            self._readers.move_to_end(path)
            return self._readers[path]
        reader = self._open(path)
        self._readers[path] = reader
        while len(self._readers) > _READER_CACHE:
            self._readers.popitem(last=False)
        return reader

    def _drop_reader(self, path: str) -> None:
        self._readers.pop(path, None)

    def _open(self, path: str) -> _Reader:
        if not os.path.isfile(path):
            raise SkippedVideo("no such file")
        width, height = _display_size(path)
        short = round(self.frame_size * _DECODE_OVERSAMPLE)
        scale = min(1.0, short / min(width, height))  # never upscale while decoding
        rw, rh = max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)
        import decord  # here, in the worker: never before torch, never in the parent

        try:
            vr = decord.VideoReader(path, ctx=decord.cpu(0), width=rw, height=rh, num_threads=1)
            n = len(vr)
            if n == 0:
                raise SkippedVideo("no decodable frames")
            ts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)  # (n, 2)
        except SkippedVideo:
            raise
        except Exception as exc:  # RuntimeError at open, DECORDError while reading
            raise SkippedVideo(f"cannot open: {one_line(exc)}") from None
        if not np.isfinite(ts).all():
            raise SkippedVideo("frame timestamps are not finite")
        starts = np.round(ts[:, 0] - ts[0, 0], 6)
        end = max(float(ts[-1, 1] - ts[0, 0]), float(starts.max()))
        if len(np.unique(starts)) < self.min_frames:
            raise SkippedVideo(f"too few frames ({len(np.unique(starts))} < {self.min_frames})")
        if end <= 0:
            raise SkippedVideo("zero duration")
        return _Reader(vr, starts, np.argsort(starts, kind="stable"), end)


def _display_size(path: str) -> tuple[int, int]:
    """(width, height) of the displayed picture (sample aspect ratio applied), from PyAV."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise SkippedVideo("not a video: no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    except SkippedVideo:
        raise
    except Exception as exc:
        raise SkippedVideo(f"cannot probe: {one_line(exc)}") from None
    if not width or not height:
        raise SkippedVideo("video stream without a frame size")
    ratio = float(sar) if sar and float(sar) > 0 else 1.0
    return max(1, round(width * ratio)), height


def collate_windows(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks the samples that have views: ``views`` (B, 2, T, 3, S, S), ``mask``
    (B, 2, T), ``video`` (B,); ``skipped`` gathers every sample's skipped videos."""
    good = [s for s in samples if s["views"] is not None]
    skipped = [pair for s in samples for pair in s["skipped"]]
    if not good:
        return {"views": None, "mask": None, "video": torch.zeros(0, dtype=torch.long), "skipped": skipped}
    return {
        "views": torch.stack([s["views"] for s in good]),
        "mask": torch.stack([s["mask"] for s in good]),
        "video": torch.tensor([s["video"] for s in good]),
        "skipped": skipped,
    }


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's keys ``(item, seed)``, epoch after epoch, as one stream.

    Each epoch is DistributedSampler's shuffled shard of this rank. The seed depends on
    (run seed, epoch, item) only, so a run draws the same windows and augmentations
    whatever the number of loader workers. The stream starts at ``position`` (items of
    this rank already consumed: a resumed run continues where it stopped) and yields
    ``count`` keys, crossing epoch boundaries without a pause, so that the loader's
    workers keep prefetching even when an epoch is a single batch.
    """

    def __init__(self, num_items: int, *, rank: int, world_size: int, seed: int) -> None:
        self._inner = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.seed = seed
        self.position = 0
        self.count = len(self._inner)

    @property
    def items_per_epoch(self) -> int:
        return len(self._inner)

    def start(self, position: int, count: int) -> None:
        self.position, self.count = position, count

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = divmod(self.position, self.items_per_epoch)
        left = self.count
        while left > 0:
            self._inner.set_epoch(epoch)
            for item in itertools.islice(iter(self._inner), skip, skip + left):
                seed = np.random.SeedSequence([self.seed, epoch, item]).generate_state(1)[0]
                yield item, int(seed)
                left -= 1
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:
        return self.count


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _worker_init(worker_id: int) -> None:
    # Loader workers share the cores with the trainer: one thread each for torch ops.
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """LARS as in facebookresearch/barlowtwins: SGD with momentum whose update of each
    weight matrix is scaled by ``eta * |w| / |update|``. Param groups with
    ``exclude=True`` (biases, norms) get neither weight decay nor the adaptation."""

    def __init__(
        self, params: Any, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta, "exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if not group["exclude"]:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # Biases and norm parameters (1-d) get no weight decay (and no LARS adaptation).
    weights = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    others = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    if config.optimizer == "lars":
        groups = [
            {"params": weights, "base_lr": config.lr},
            {"params": others, "base_lr": config.lr * config.lr_bias_ratio, "exclude": True},
        ]
        return LARS(groups, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        groups = [
            {"params": weights, "base_lr": config.lr, "weight_decay": config.weight_decay},
            {"params": others, "base_lr": config.lr, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=config.lr)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up from 0, then cosine decay to 0.001 (Barlow Twins' schedule).
    ``step`` counts from 0."""
    warmup = max(1, round(total * warmup_fraction)) if warmup_fraction > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _TwinForward(nn.Module):
    """Both views in one ``forward`` (as DDP wants one forward per backward), each through
    the encoder on its own, so batch norms see one view's batch at a time (as in
    facebookresearch/barlowtwins)."""

    def __init__(self, encoder: VideoEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, views: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # views: (B, 2, T, 3, S, S); mask: (B, 2, T) -> two (B, embed_dim)
        return self.encoder(views[:, 0], mask[:, 0]), self.encoder(views[:, 1], mask[:, 1])


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path  # final weights (model-step<N>.pt), what a model version points to
    out_dir: Path
    config: TrainConfig
    steps: int  # optimizer steps taken in total (a resumed run counts the earlier ones)
    epochs: float  # passes over the videos, fractional
    clips: int  # window pairs trained on in total
    videos: int  # videos given
    skipped: dict[str, str]  # path -> reason, videos that could not be used
    final_metrics: dict[str, float]  # mean of the last steps: loss, on_diag, off_diag
    clips_per_s: float  # this run's throughput, first steps (warm-up) excluded
    seconds: float  # this run's wall time
    metrics_path: Path
    loss_plot: Path | None
    init_checkpoint: Path | None = None


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    """Joins the process group torchrun describes (WORLD_SIZE > 1), or one that exists."""
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, created=True)


def train(
    config: TrainConfig,
    videos: Sequence[Path],
    *,
    out_dir: Path,
    resume: bool = False,
    init_checkpoint: Path | None = None,
    progress: bool = False,
) -> TrainResult:
    """Trains the encoder on ``videos`` with the Barlow Twins objective.

    ``resume``: continue from ``out_dir/last.pt`` (weights, optimizer, step, position in
    the epoch) up to the step budget of ``config``; without it, an ``out_dir`` that already
    holds a run is refused. ``init_checkpoint``: start from these weights (fine-tuning);
    its encoder architecture replaces ``config.encoder``'s. Runs on every rank under
    ``torchrun``; returns the same result on each.
    """
    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    ctx = _init_distributed()
    try:
        return _train(config, list(videos), out_dir, resume, init_checkpoint, progress, ctx)
    finally:
        torch.set_num_threads(threads)
        if ctx.created:
            dist.destroy_process_group()


def finetune(
    config: TrainConfig,
    videos: Sequence[Path],
    *,
    init_checkpoint: Path,
    out_dir: Path,
    epochs: int = 5,
    resume: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Continues training ``init_checkpoint`` for ``epochs`` passes over ``videos`` (the
    company's library); the optimizer and schedule start afresh."""
    config = dataclasses.replace(config, epochs=epochs, steps=None)
    return train(config, videos, out_dir=out_dir, resume=resume, init_checkpoint=init_checkpoint, progress=progress)


def _train(
    config: TrainConfig,
    videos: list[Path],
    out_dir: Path,
    resume: bool,
    init_checkpoint: Path | None,
    progress: bool,
    ctx: _Dist,
) -> TrainResult:
    started = time.perf_counter()
    device = torch.device(f"cuda:{ctx.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    last_path = out_dir / LAST_CHECKPOINT
    state: dict[str, Any] | None = None
    if resume and last_path.exists():
        encoder, state = load_checkpoint(last_path)
        if encoder.config != config.encoder and init_checkpoint is None:
            raise ValueError(f"{last_path} holds a {encoder.config} encoder; the config asks for {config.encoder}")
        config = dataclasses.replace(config, encoder=encoder.config)
        logger.info("resuming %s at step %d", last_path, state["step"])
    elif last_path.exists() and not resume:
        raise FileExistsError(f"{out_dir} already holds a run ({LAST_CHECKPOINT}): resume it or use another out_dir")
    elif init_checkpoint is not None:
        encoder, payload = load_checkpoint(init_checkpoint)
        config = dataclasses.replace(config, encoder=encoder.config)
        logger.info("initialised from %s (step %s)", init_checkpoint, payload.get("step"))
    else:
        with torch.random.fork_rng(devices=[]):
            # The same initial weights on every rank; seed 0 gives initial_encoder()'s.
            torch.manual_seed(config.seed)
            encoder = VideoEncoder(config.encoder)
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)

    if config.batch_size < 2 * ctx.world_size or config.batch_size % ctx.world_size:
        raise ValueError(f"batch_size {config.batch_size}: needs a multiple of {ctx.world_size} ranks, >= 2 per rank")
    local_batch = config.batch_size // ctx.world_size
    dataset = WindowDataset(
        videos,
        frames=config.frames,
        fps=config.fps,
        augment=config.augmenters(),
        short_videos=config.short_videos,
        min_frames=config.min_frames,
        clips_per_video=config.clips_per_video,
    )
    sampler = EpochSampler(len(dataset), rank=ctx.rank, world_size=ctx.world_size, seed=config.seed)
    per_epoch = sampler.items_per_epoch  # items of this rank per pass over the videos
    # An epoch may be shorter than a batch (a small library): batches then span epochs.
    total_steps = (
        config.steps if config.steps is not None else math.ceil((config.epochs or 1) * per_epoch / local_batch)
    )
    if total_steps < 1:
        raise ValueError("nothing to train: steps or epochs must be >= 1")

    # Model, optimizer, precision.
    encoder.train().to(device)
    encoder.backbone.to(memory_format=torch.channels_last)
    if config.freeze_backbone_bn_stats:
        for module in encoder.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    for module in _backbone_stages(encoder.backbone)[: config.freeze_backbone_stages]:
        module.requires_grad_(False)
    if ctx.enabled and device.type == "cuda":
        # The projector's batch norms normalise per batch of videos: make that the global
        # batch, as the loss does. (SyncBatchNorm needs GPUs; the backbone's batch norms
        # see B*T frames per rank, plenty for their statistics.)
        encoder.projector = nn.SyncBatchNorm.convert_sync_batchnorm(encoder.projector)
    twin: nn.Module = _TwinForward(encoder)
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        twin = DistributedDataParallel(twin, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    optimizer = _make_optimizer(encoder, config)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and (device.type == "cuda" or _cpu_has_bf16()))

    # position: items of this rank's stream consumed (loaded batches, used or skipped).
    step, position, clips_total = 0, 0, 0
    skipped: dict[str, str] = {}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, position, clips_total = int(state["step"]), int(state["position"]), int(state["clips"])
        skipped = dict(state.get("skipped", {}))
    metrics_path = out_dir / METRICS_FILE
    if ctx.main:
        _truncate_metrics(metrics_path, step)

    def save_state(path: Path) -> None:
        save_checkpoint(
            path,
            encoder,
            extra={
                "train_config": config.to_dict(),
                "step": step,
                "epoch": position / per_epoch,
                "position": position,
                "clips": clips_total,
                "optimizer": optimizer.state_dict(),
                "skipped": skipped,
            },
        )

    logger.info(
        "training on %d videos (%d items/epoch/rank), steps %d -> %d, "
        "global batch %d on %d rank(s), %s, device %s%s",
        len(videos), per_epoch, step, total_steps,
        config.batch_size, ctx.world_size, config.encoder.backbone, device, " bf16" if bf16 else "",
    )  # fmt: skip
    recent: list[dict[str, float]] = []
    timed_clips, timed_s, first_step = 0, 0.0, step
    saved_step, failures = -1, 0
    loader: DataLoader | None
    bar = _Progress(total_steps, step, enabled=progress and ctx.main)
    with bar, open(metrics_path, "a", encoding="utf-8") if ctx.main else contextlib.nullcontext() as log:
        while step < total_steps:
            # Enough items for the steps left, plus a few batches for steps skipped.
            sampler.start(position, (total_steps - step + 8) * local_batch)
            loader = _make_loader(dataset, sampler, local_batch, config, device)
            t_wait = time.perf_counter()
            try:
                for batch in loader:
                    t_start = time.perf_counter()
                    position += local_batch
                    for path, reason in batch["skipped"]:
                        if path not in skipped:
                            skipped[path] = reason
                            logger.warning("skipped %s: %s", path, reason)
                    row = _step(twin, optimizer, batch, config, step, total_steps, device, bf16, ctx)
                    if row is None:
                        t_wait = time.perf_counter()
                        continue
                    step += 1
                    now = time.perf_counter()
                    clips_total += int(row["clips"])
                    row.update(
                        step=step,
                        epoch=round(position / per_epoch, 4),
                        data_s=round(t_start - t_wait, 4),
                        step_s=round(now - t_start, 4),
                        clips_per_s=round(row["clips"] / max(1e-9, now - t_wait), 3),
                    )
                    if step - first_step > 2:  # the first steps pay for warm-up and worker start
                        timed_clips += int(row["clips"])
                        timed_s += now - t_wait
                    recent = [*recent[-9:], row]
                    if log is not None:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    bar.update(step, row)
                    if step % config.checkpoint_every == 0 or step >= total_steps:
                        if ctx.main:
                            save_state(last_path)
                        saved_step = step
                        if ctx.enabled:
                            dist.barrier()
                    t_wait = time.perf_counter()
                    if step >= total_steps:
                        break
            except RuntimeError as exc:
                # A worker that died (a decoder crash) or went silent (a decoder hang):
                # lose that batch, rebuild the loader after it, go on.
                if "DataLoader" not in str(exc) or failures >= config.max_loader_failures:
                    raise
                failures += 1
                position += local_batch
                logger.error("data loader failed (%s); skipping one batch, restarting the loader", one_line(exc))
            finally:
                loader = None  # the iterator's end shuts its workers down

    if ctx.main and config.encoder.library_norm != "none":
        _fit_library_norm(encoder, videos, limit=config.norm_videos, seed=config.seed)
    final = out_dir / f"model-step{step:06d}.pt"
    final_metrics = (
        {k: float(np.mean([r[k] for r in recent])) for k in ("loss", "on_diag", "off_diag")} if recent else {}
    )
    plot = None
    if ctx.main:
        if saved_step != step:
            save_state(last_path)
        save_checkpoint(
            final,
            encoder,
            extra={
                "train_config": config.to_dict(),
                "step": step,
                "epoch": position / per_epoch,
                "clips": clips_total,
                "metrics": final_metrics,
                "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
            },
        )
        plot = write_loss_plot(metrics_path, out_dir / LOSS_PLOT, lambd=config.lambd)
    if ctx.enabled:
        dist.barrier()
    clips_per_s = timed_clips / timed_s if timed_s > 0 else 0.0
    seconds = time.perf_counter() - started
    if ctx.main:
        logger.info("trained to step %d in %.0f s: %.2f clips/s, loss %s; %s",
                    step, seconds, clips_per_s, final_metrics.get("loss"), final)  # fmt: skip
    return TrainResult(
        checkpoint=final,
        out_dir=out_dir,
        config=config,
        steps=step,
        epochs=position / per_epoch,
        clips=clips_total,
        videos=len(videos),
        skipped=skipped,
        final_metrics=final_metrics,
        clips_per_s=clips_per_s,
        seconds=seconds,
        metrics_path=metrics_path,
        loss_plot=plot,
        init_checkpoint=init_checkpoint,
    )


def _fit_library_norm(encoder: VideoEncoder, videos: Sequence[Path], *, limit: int, seed: int) -> None:
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


def _backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """A ResNet's stages in order: the stem (conv1, bn1), then layer1..layer4."""
    stem = [getattr(backbone, n) for n in ("conv1", "bn1") if hasattr(backbone, n)]
    layers = [getattr(backbone, f"layer{i}") for i in range(1, 5) if hasattr(backbone, f"layer{i}")]
    return [nn.ModuleList(stem), *layers]


def _make_loader(
    dataset: WindowDataset, sampler: EpochSampler, batch_size: int, config: TrainConfig, device: torch.device
) -> DataLoader:
    workers = config.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,  # batch norm and the loss want full batches
        collate_fn=collate_windows,
        num_workers=workers,
        # One iterator streams every epoch (see EpochSampler), so workers and the decord
        # readers they keep open live across epochs without persistent_workers.
        persistent_workers=False,
        prefetch_factor=config.prefetch_factor if workers > 0 else None,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if workers > 0 else None,
        timeout=config.loader_timeout_s if workers > 0 else 0,
    )


def _step(
    twin: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    config: TrainConfig,
    step: int,
    total_steps: int,
    device: torch.device,
    bf16: bool,
    ctx: _Dist,
) -> dict[str, float] | None:
    """One optimizer step; None (on every rank alike) when some rank has under 2 clips."""
    views, mask = batch["views"], batch["mask"]
    local = 0 if views is None else views.shape[0]
    counts = torch.tensor([local], device=device)
    if ctx.enabled:
        fewest = counts.clone()
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
        dist.all_reduce(counts)
        if fewest.item() < 2:
            logger.warning("step %d skipped: a rank has under 2 decodable clips", step + 1)
            return None
    elif local < 2:
        logger.warning("step %d skipped: under 2 decodable clips", step + 1)
        return None
    factor = lr_factor(step, total_steps, config.warmup_fraction)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    views = views.to(device, non_blocking=True)  # (B, 2, T, 3, S, S)
    mask = mask.to(device, non_blocking=True)  # (B, 2, T)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        z1, z2 = twin(views, mask)  # (B, embed_dim) each
    terms = barlow_twins_terms(z1, z2, lambd=config.lambd, distributed=ctx.enabled)
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(twin.parameters(), config.grad_clip)
    optimizer.step()
    return {
        "loss": float(terms.loss.detach()),
        "on_diag": float(terms.on_diag.detach()),
        "off_diag": float(terms.off_diag.detach()),
        "lr": optimizer.param_groups[0]["lr"],
        "clips": float(counts.item()),
    }


def _truncate_metrics(path: Path, step: int) -> None:
    """Keeps the rows of steps <= ``step`` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = [ln for ln in rows if json.loads(ln).get("step", 0) <= step]
    write_atomic(path, "".join(ln + "\n" for ln in kept))


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.jsonl``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_loss_plot(metrics_path: Path, out: Path, *, lambd: float | None = None) -> Path | None:
    """Plots loss, on-diagonal and weighted off-diagonal terms per step into ``out`` (PNG)."""
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in rows], label="loss", color="C0", alpha=0.35)
    ax.plot(steps, _smooth([r["loss"] for r in rows]), label="loss (smoothed)", color="C0")
    ax.plot(steps, _smooth([r["on_diag"] for r in rows]), label="on-diagonal", color="C1", ls="--")
    if lambd is not None:
        ax.plot(
            steps, _smooth([lambd * r["off_diag"] for r in rows]), label=f"{lambd:g} x off-diagonal", color="C2", ls=":"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("Barlow Twins loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return out


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


class _Progress:
    """A rich progress bar (steps, loss, clips/s), or nothing."""

    def __init__(self, total: int, done: int, *, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TimeRemainingColumn(),
            )  # fmt: skip
            self._task = self._bar.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, row: dict[str, float]) -> None:
        if self._bar is not None:
            info = f"loss {row['loss']:.1f}  {row['clips_per_s']:.1f} clips/s"
            self._bar.update(self._task, completed=step, info=info)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


def register_trained(session: Any, result: TrainResult, *, name: str, parent_id: int | None = None) -> Any:
    """Records ``result``'s checkpoint as a (not yet active) model version; returns it.
    The caller owns the transaction (and activates the version when it is indexed)."""
    from app.learn.registry import register_model

    return register_model(
        session,
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


__all__ = [
    "PRESETS",
    "EpochSampler",
    "TrainConfig",
    "TrainResult",
    "WindowDataset",
    "collate_windows",
    "finetune",
    "lr_factor",
    "read_metrics",
    "register_trained",
    "train",
    "write_loss_plot",
]
