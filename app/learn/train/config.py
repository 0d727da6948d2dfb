"""What a training run depends on: :class:`TrainConfig` (stored in every checkpoint) and
the named presets."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from app.learn.augment import FAMILIES, ClipAugment
from app.learn.device import Precision
from app.learn.encoder import EncoderConfig
from app.learn.loss import DEFAULT_LAMBD

# The augmentation families trained by default: all but those whose benchmark edits are
# held out of training (app.evaluate.edits.HELD_OUT_EDITS: rotation, vertical mirror,
# noise, re-encoding, overlays, speed changes, frame drops, insertion), so that the
# benchmark measures how far the invariances learned carry to edits never trained on.
HELD_OUT_FAMILIES: tuple[str, ...] = (
    "rotate",
    "vflip",
    "noise",
    "reencode",
    "overlay",
    "speed",
    "frame_drop",
    "insert",
)
TRAINED_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f not in HELD_OUT_FAMILIES)
# The families without a knob of their own in TrainConfig: each drawn with TrainConfig.family_p.
_FAMILIES_AT_FAMILY_P = (
    "rotate",
    "vflip",
    "noise",
    "reencode",
    "overlay",
    "pip",
    "blend",
    "speed",
    "frame_drop",
    "insert",
)


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
    # The edit families augmentation draws from (app.learn.augment.FAMILIES); a family
    # left out is never drawn, whatever its knob above says. The families without a knob
    # of their own (rotate, vflip, noise, reencode, overlay, pip, blend, speed,
    # frame_drop, insert) are each drawn with probability family_p per view.
    augment_families: tuple[str, ...] = TRAINED_FAMILIES
    family_p: float = 0.2
    # The second view's window starts this many seconds (at most, either way) from the
    # first's, so both show some of the same moments (the frame-level objective pairs
    # them); None: two independent windows anywhere in the video.
    view_shift_s: float | None = None
    # Objective.
    lambd: float = DEFAULT_LAMBD
    # Weight of the frame-level term: Barlow Twins between the two views' per-second
    # descriptors (VideoEncoder.frame_descriptors) of the same moments; 0 leaves it out.
    frame_weight: float = 1.0
    frame_lambd: float = DEFAULT_LAMBD
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
    precision: Precision = "auto"
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
        unknown = set(self.augment_families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown augmentation families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")

        def p(family: str, value: float) -> float:
            return value if family in self.augment_families else 0.0

        s = self.jitter_strength
        colour = "colour" in self.augment_families
        common: dict[str, Any] = {
            "scale": self.crop_scale if "crop" in self.augment_families else (1.0, 1.0),
            "jitter_p": 0.8 if colour else 0.0,
            "brightness": 0.4 * s,
            "contrast": 0.4 * s,
            "saturation": 0.2 * s,
            "hue": min(0.5, 0.1 * s),
            "flip_p": p("hflip", 0.5),
            "grayscale_p": p("grayscale", self.grayscale_p),
            "zoom_out_p": p("letterbox", self.zoom_out_p),
            **{f"{family}_p": p(family, self.family_p) for family in _FAMILIES_AT_FAMILY_P},
        }  # fmt: skip
        size = self.encoder.frame_size
        blur = (p("blur", self.blur_p[0]), p("blur", self.blur_p[1]))
        return (
            ClipAugment(size, blur_p=blur[0], solarize_p=self.solarize_p[0], **common),
            ClipAugment(size, blur_p=blur[1], solarize_p=self.solarize_p[1], **common),
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
        for name in ("crop_scale", "blur_p", "solarize_p", "augment_families"):
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
        view_shift_s=8.0,  # a quarter of the window: both views share most of their moments
    ),
    # Minutes on 2 CPU cores: 64 px, 4 frames a window, 300 steps of 16 clips (0.6-2 s a
    # step on a shared 2-core machine). Measured on the retrieval benchmark (README), as a
    # fine-tune on a small library from the initial weights: the backbone keeps its
    # initial batch-norm statistics and its stem, layer1 and layer2 (a small library
    # cannot retrain the low-level filters that tell near-duplicates apart; training them
    # cost recall), a low learning rate (3e-4 destroyed the initial features faster than
    # it learned), a 256-d projector (batch 16 cannot estimate a 1024-d correlation
    # matrix), crops keeping at least half the frame, a zoom-out now and then; served
    # vectors are centred and whitened by the library's statistics; frame descriptors and
    # served vectors carry thumbnails, as the initial encoder's do (training does not touch
    # them).
    "cpu-small": TrainConfig(
        encoder=EncoderConfig(
            backbone="resnet18",
            frame_size=64,
            embed_dim=256,
            projector_hidden=1024,
            library_norm="centre+whiten",
            frame_thumbnail=16,
            frame_thumbnail_mirrors=True,
            video_thumbnail_weight=0.5,
        ),
        frames=4,
        view_shift_s=1.0,  # windows of 4 s sharing >= 3 moments: the frame-level term's pairs
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
# Pre-training on the offline corpus (`vidsim corpus build`) on 2 CPU cores: cpu-small's
# recipe for 240 steps (measured 2-4 clips/s on this shared 2-core machine: about 20-25
# minutes; 48 steps took 5), its library normalisation fitted on 64 of the corpus's clips
# (a fine-tune on the company's library refits it on theirs).
PRESETS["cpu-pretrain"] = dataclasses.replace(PRESETS["cpu-small"], steps=240, norm_videos=64, checkpoint_every=40)
