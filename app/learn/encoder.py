"""The video encoder: a per-frame torchvision backbone, temporal aggregation, and a
Barlow Twins projector. This module knows nothing of training, serving, Celery or the
database: it is an ``nn.Module``, its config, and checkpoint load/save.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from app.files import atomic_path
from app.index.mirrors import mirror_basis, mirror_invariant

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderConfig:
    backbone: str = "resnet18"  # any torchvision classification model with an .fc head
    frame_size: int = 224  # frames are square, frame_size x frame_size
    embed_dim: int = 4096  # projector output (the specification's video embedding)
    projector_hidden: int = 4096
    # Which vector serves retrieval: the backbone representation after temporal pooling,
    # or the projector output. Decided by the retrieval benchmark (see README).
    serve: Literal["representation", "projection"] = "representation"
    # Temporal aggregation of the frame features: "conv" (a residual temporal convolution,
    # then mean and max merged, TemporalPool) or "mean" (the masked mean, no parameters).
    temporal: Literal["conv", "mean"] = "conv"
    # Normalisation of the served vectors by statistics of the library (fitted after
    # training, VideoEncoder.fit_library_norm): "centre" subtracts the library's mean
    # vector; "centre+whiten" serves [centred, PCA-whitened] halves (each L2-normalised,
    # together unit length), so a score is the mean of the two cosines. Comparable scores
    # across queries (micro-AP) need them: a network's raw vectors crowd into a narrow cone.
    library_norm: Literal["none", "centre", "centre+whiten"] = "none"
    # The frame-level descriptor (one per sampled frame, from the same forward pass): the
    # backbone's frame features projected to frame_dim. The second stage of a search
    # aligns a query's frames with a candidate's (app.index.align). 128 rather than 256:
    # half the second stage's time and storage for recall@1 unchanged on the benchmark's
    # dev part (mAP -0.009, micro-AP -0.006).
    frame_dim: int = 128
    # Each frame descriptor also carries the frame itself shrunk to N x N grey levels,
    # mean-centred and unit length (0: none), weighted so that a pair of frames' cosine is
    # (1 - w) x the network's descriptors' + w x the thumbnails' (w: frame_thumbnail_weight).
    # A network's frame features tell apart textures and objects; a thumbnail, the layout
    # of light and dark, which survives colour, re-encoding and overlay edits that move
    # an untrained network's features (README, "Thumbnails in the frame descriptors").
    frame_thumbnail: int = 0
    frame_thumbnail_weight: float = 0.3
    # The thumbnail summed with its left-right, up-down and half-turn mirror images and
    # kept as one quadrant ((N/2)^2 values): the same for a frame and its mirror images,
    # which an untrained network's features are not invariant to (README,
    # "Mirror-invariant thumbnails"). N must be even.
    frame_thumbnail_fold: bool = False
    # The whole thumbnail, stored in its mirror components (app.index.mirrors: an
    # orthonormal change of basis, N^2 values), so that the second stage compares each
    # frame with the other's mirror images too, keeping the best, at the cost of one
    # product: mirrored copies match without folding away the layout that crops and
    # letterboxes keep (README, "Mirror-matched thumbnails"). N must be even.
    frame_thumbnail_mirrors: bool = False
    # The served vector also carries the clip's mean mirror-matched thumbnail, weighted so
    # that two videos' cosine is (1 - w) x the network's vectors' + w x the thumbnails'
    # (0: none). Kept as its mirror-invariant part (the EE block, then the magnitudes of
    # the other three), so that a mirrored copy's is its source's. The first stage then
    # finds copies whose light and dark layout survived edits that move an untrained
    # network's vector (brightness and contrast, above all), among hundreds of other
    # videos (README, "A library of hundreds: distractors"). Needs frame_thumbnail_mirrors.
    video_thumbnail_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.frame_thumbnail_fold and self.frame_thumbnail_mirrors:
            raise ValueError("a thumbnail is either folded or stored in its mirror components, not both")
        if (self.frame_thumbnail_fold or self.frame_thumbnail_mirrors) and self.frame_thumbnail % 2:
            raise ValueError(f"a folded or mirror-matched thumbnail needs an even size, got {self.frame_thumbnail}")
        if self.video_thumbnail_weight and not (self.frame_thumbnail and self.frame_thumbnail_mirrors):
            raise ValueError("a video thumbnail is the mean of mirror-matched frame thumbnails: set those first")
        if not 0 <= self.video_thumbnail_weight < 1:
            raise ValueError(f"video_thumbnail_weight must be in [0, 1), got {self.video_thumbnail_weight}")

    @property
    def thumbnail_dim(self) -> int:
        """The values a frame's thumbnail adds to its descriptor."""
        side = self.frame_thumbnail // 2 if self.frame_thumbnail_fold else self.frame_thumbnail
        return side * side

    @property
    def descriptor_dim(self) -> int:
        """The dimension of a stored frame descriptor (frame_dim, then the thumbnail)."""
        return self.frame_dim + self.thumbnail_dim

    @property
    def representation_dim(self) -> int:
        return _backbone_dim(self.backbone)

    @property
    def base_dim(self) -> int:
        """The dimension of the served vector before library normalisation."""
        return self.representation_dim if self.serve == "representation" else self.embed_dim

    @property
    def output_dim(self) -> int:
        """The served vector's dimension: library-normalised, then the video thumbnail."""
        normalised = self.base_dim * (2 if self.library_norm == "centre+whiten" else 1)
        return normalised + (self.thumbnail_dim if self.video_thumbnail_weight else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _backbone_dim(name: str) -> int:
    return {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}.get(name) or (
        _build_backbone(name)[1]
    )


def _build_backbone(name: str) -> tuple[nn.Module, int]:
    net = torchvision.models.get_model(name, weights=None)
    if not hasattr(net, "fc"):
        raise ValueError(f"backbone {name!r} has no .fc head; use a ResNet-style model")
    dim = int(net.fc.in_features)
    net.fc = nn.Identity()
    return net, dim


class TemporalPool(nn.Module):
    """Mixes neighbouring frames with a residual temporal convolution, then pools the
    valid frames (mean and max, projected back to the frame dimension)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mix = nn.Conv1d(dim, dim, kernel_size=3, padding=1, groups=8, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.merge = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.mix.weight)  # starts as identity: pooling of frame features

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D) frame features, mask: (B, T) True for real frames
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        # Padding frames enter the convolution as zeros, as the ends of a clip do: a clip's
        # vector must not depend on the longer clips it shares a batch with.
        x = x + self.mix((x * m).transpose(1, 2)).transpose(1, 2)
        x = self.norm(x)
        mean = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        peak = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        return self.merge(torch.cat([mean, peak], dim=-1))  # (B, D)


class MeanPool(nn.Module):
    """The mean of the valid frames' features: (B, T, D), mask (B, T) -> (B, D)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class VideoEncoder(nn.Module):
    luma: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    centre: torch.Tensor
    whiten: torch.Tensor

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone, dim = _build_backbone(config.backbone)
        if config.temporal not in ("conv", "mean"):
            raise ValueError(f"unknown temporal aggregation {config.temporal!r}")
        self.temporal: nn.Module = TemporalPool(dim) if config.temporal == "conv" else MeanPool()
        h, e = config.projector_hidden, config.embed_dim
        self.projector = nn.Sequential(
            nn.Linear(dim, h, bias=False),
            nn.BatchNorm1d(h),
            nn.ReLU(inplace=True),
            nn.Linear(h, h, bias=False),
            nn.BatchNorm1d(h),
            nn.ReLU(inplace=True),
            nn.Linear(h, e, bias=False),
        )
        # Starts as a random orthogonal projection (a fixed generator, the same on every
        # machine): an untrained head keeps the backbone's frame geometry (cosines are
        # nearly preserved); training (app.learn.train) makes it copy-robust.
        self.frame_head = nn.Linear(dim, config.frame_dim, bias=False)
        nn.init.orthogonal_(self.frame_head.weight, generator=torch.Generator().manual_seed(0))
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]), persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1))
        if config.library_norm not in ("none", "centre", "centre+whiten"):
            raise ValueError(f"unknown library_norm {config.library_norm!r}")
        # Library statistics (config.library_norm), set by fit_library_norm: the mean
        # L2-normalised served vector, and a whitening matrix of the centred ones. Until
        # fitted (zeros, identity), the normalisation leaves cosine scores unchanged.
        d = config.base_dim
        self.register_buffer("centre", torch.zeros(d))
        self.register_buffer("whiten", torch.eye(d))

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: (B, T, 3, H, W) floats in [0, 1] -> the backbone's (B, T, D) features."""
        b, t = frames.shape[:2]
        x = (frames - self.mean) / self.std
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)  # (B*T, 3, H, W)
        return self.backbone(x).view(b, t, -1).float()

    def pool(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) frame features, mask (B, T) -> the (B, D) video representation."""
        if mask is None:
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        return self.temporal(feats, mask)

    def represent(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """frames: (B, T, 3, H, W) floats in [0, 1]; mask: (B, T) bool. Returns (B, D)."""
        return self.pool(self.frame_features(frames), mask)

    def frame_descriptors(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The (B, T, frame_dim) frame-level descriptors, unnormalised (``mask`` is
        accepted for symmetry with :meth:`represent`: each frame is described alone)."""
        return self.frame_head(self.frame_features(frames))

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The training output: projector embedding, (B, embed_dim)."""
        return self.projector(self.represent(frames, mask))

    @torch.inference_mode()
    def embed(self, clips: list[np.ndarray], *, bf16: bool = False) -> np.ndarray:
        """Serving: L2-normalised vectors for clips of uint8 frames, each (T, H, W, 3).

        Clips of different lengths share one forward pass, padded and masked.
        Returns float32 (len(clips), output_dim).
        """
        return self.describe(clips, bf16=bf16)[0]

    @torch.inference_mode()
    def describe(self, clips: list[np.ndarray], *, bf16: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """:meth:`embed`'s vectors and, from the same forward pass, each clip's frame
        descriptors: float32 (T_i, descriptor_dim), L2-normalised per frame."""
        if not clips:
            return np.zeros((0, self.config.output_dim), dtype=np.float32), []
        vectors, frames = self._unit_vectors(clips, bf16=bf16, with_frames=True)
        assert frames is not None
        per_clip = [frames[i, : len(clip)].cpu().numpy() for i, clip in enumerate(clips)]
        lengths = torch.tensor([len(clip) for clip in clips], device=frames.device)
        served = self._with_video_thumbnail(self._library_normalise(vectors), frames, lengths)
        return served.cpu().numpy(), per_clip

    @torch.inference_mode()
    def describe_stream(self, chunks: Iterable[np.ndarray], *, bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`describe` of one clip whose frames arrive in chunks, each (n, H, W, 3)
        uint8 (e.g. from a decoder still at work on the next ones).

        The backbone runs on each chunk as it comes; the temporal pooling and the heads
        then run once over all the frames, so the result equals ``describe([clip])`` for
        the concatenated clip (up to float rounding). Returns the clip's (output_dim,)
        vector and its (T, descriptor_dim) unit frame descriptors, float32.
        """
        self.eval()
        parts, thumbnails = [], []
        with self._autocast(bf16):
            for chunk in chunks:
                if len(chunk):
                    pixels = self._clip_tensor(chunk).unsqueeze(0)  # (1, n, 3, S, S)
                    parts.append(self.frame_features(pixels))  # (1, n, D)
                    if self.config.frame_thumbnail:
                        thumbnails.append(self._thumbnails(pixels))
        if not parts:
            raise ValueError("describe_stream needs at least one frame")
        feats = torch.cat(parts, dim=1)  # (1, T, D)
        mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        joined = torch.cat(thumbnails, dim=1) if thumbnails else None
        vectors, frames = self._heads(feats, mask, bf16=bf16, with_frames=True, thumbnails=joined)
        assert frames is not None
        lengths = torch.tensor([frames.shape[1]], device=frames.device)
        served = self._with_video_thumbnail(self._library_normalise(vectors), frames, lengths)
        return served[0].cpu().numpy(), frames[0].cpu().numpy()

    @torch.inference_mode()
    def _unit_vectors(
        self, clips: list[np.ndarray], *, bf16: bool, with_frames: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(len(clips), base_dim) unit vectors before library normalisation, and with
        ``with_frames`` the (len(clips), T_max, descriptor_dim) unit frame descriptors."""
        self.eval()
        device = self.mean.device
        t_max = max(len(c) for c in clips)
        size = self.config.frame_size
        frames = torch.zeros(len(clips), t_max, 3, size, size, device=device)
        mask = torch.zeros(len(clips), t_max, dtype=torch.bool, device=device)
        for i, clip in enumerate(clips):
            frames[i, : len(clip)] = self._clip_tensor(clip)
            mask[i, : len(clip)] = True
        with self._autocast(bf16):
            feats = self.frame_features(frames)
        thumbnails = self._thumbnails(frames) if with_frames and self.config.frame_thumbnail else None
        return self._heads(feats, mask, bf16=bf16, with_frames=with_frames, thumbnails=thumbnails)

    def _thumbnails(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) floats in [0, 1] -> (B, T, config.thumbnail_dim): each frame's
        grey levels averaged over N x N blocks (N = config.frame_thumbnail), folded onto
        one quadrant with ``frame_thumbnail_fold``, mean-centred, unit length (zeros for a
        flat frame)."""
        n = self.config.frame_thumbnail
        b, t = frames.shape[:2]
        with torch.autocast(frames.device.type, enabled=False):  # float32 however the network runs
            grey = torch.einsum("btchw,c->bthw", frames.float(), self.luma)
            small = F.adaptive_avg_pool2d(grey.reshape(b * t, 1, *grey.shape[-2:]), n)  # (B*T, 1, N, N)
            if self.config.frame_thumbnail_fold:
                small = small + small.flip(-1)
                small = (small + small.flip(-2))[..., : n // 2, : n // 2]
            small = small.reshape(b, t, -1)
            centred = small - small.mean(-1, keepdim=True)
            if self.config.frame_thumbnail_mirrors:  # orthonormal: the norm below is the same
                centred = centred @ torch.tensor(mirror_basis(n), dtype=centred.dtype, device=centred.device).T
        norm = centred.norm(dim=-1, keepdim=True)
        # Flat within a grey level (1/255 of the range): no layout to compare, and its
        # rounding noise must not be blown up to unit length.
        return torch.where(norm > 1e-3, centred / norm.clamp_min(1e-3), torch.zeros_like(centred))

    def _clip_tensor(self, clip: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 frames -> (T, 3, size, size) floats in [0, 1] on the model's device."""
        size = self.config.frame_size
        x = torch.from_numpy(np.ascontiguousarray(clip)).to(self.mean.device)  # (T, H, W, 3) uint8
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (T, 3, H, W)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return x

    def _autocast(self, bf16: bool) -> torch.autocast:
        """bf16 autocast on the GPU always, on the CPU when asked for."""
        device = self.mean.device
        return torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=(bf16 and device.type == "cpu") or device.type == "cuda"
        )

    def _heads(
        self, feats: torch.Tensor, mask: torch.Tensor, *, bf16: bool, with_frames: bool,
        thumbnails: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """(B, T, D) frame features, mask (B, T) -> the (B, base_dim) unit served vectors
        and, with ``with_frames``, the (B, T, descriptor_dim) unit frame descriptors (the
        frames' ``thumbnails`` (B, T, thumbnail_dim), :meth:`_thumbnails`, after the head's part)."""
        with self._autocast(bf16):
            rep = self.pool(feats, mask)
            out = rep if self.config.serve == "representation" else self.projector(rep)
            described = self.frame_head(feats) if with_frames else None
        if described is not None:
            described = F.normalize(described.float(), dim=-1)
            if thumbnails is not None:
                w = self.config.frame_thumbnail_weight
                described = torch.cat([math.sqrt(1 - w) * described, math.sqrt(w) * thumbnails], dim=-1)
                described = F.normalize(described, dim=-1)  # (a flat frame's thumbnail is zero)
        return F.normalize(out.float(), dim=-1), described

    def _with_video_thumbnail(self, served: torch.Tensor, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, D) unit served vectors with each clip's video thumbnail after them
        (config.video_thumbnail_weight), from its first ``lengths`` (B,) frame descriptors
        (B, T, descriptor_dim): the mean of their thumbnails' mirror components, the odd
        blocks' magnitudes, unit length."""
        w = self.config.video_thumbnail_weight
        if not w:
            return served
        thumbnails = frames[..., self.config.frame_dim :].float()  # (B, T, N^2): EE, EO, OE, OO
        valid = (torch.arange(frames.shape[1], device=frames.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        mean = (thumbnails * valid).sum(1) / valid.sum(1).clamp_min(1)
        invariant = torch.from_numpy(mirror_invariant(mean.cpu().numpy())).to(served.device)
        return F.normalize(
            torch.cat([math.sqrt(1 - w) * served, math.sqrt(w) * F.normalize(invariant, dim=-1)], dim=-1), dim=-1
        )

    def _library_normalise(self, v: torch.Tensor) -> torch.Tensor:
        """(B, base_dim) unit vectors -> (B, output_dim) unit vectors (config.library_norm)."""
        if self.config.library_norm == "none":
            return v
        centred = F.normalize(v - self.centre, dim=-1)
        if self.config.library_norm == "centre":
            return centred
        whitened = F.normalize(centred @ self.whiten, dim=-1)
        return torch.cat([centred, whitened], dim=-1) / math.sqrt(2.0)

    @torch.no_grad()
    def fit_library_norm(
        self, clips: list[np.ndarray], *, shrinkage: float = 0.1, batch_size: int = 8, bf16: bool = False
    ) -> None:
        """Fits the library statistics of ``config.library_norm`` on ``clips`` (the
        library's, decoded as serving decodes them): the mean unit served vector, and the
        whitening ``(C + eps I)^-1/2`` of the centred ones' covariance ``C``, with ``eps`` =
        ``shrinkage`` x C's mean eigenvalue over its rank (a small library gives a
        low-rank C; the shrinkage keeps the directions it did not see)."""
        self.centre.zero_()
        self.whiten.copy_(torch.eye(len(self.centre)))
        if self.config.library_norm == "none" or not clips:
            return
        parts = [self._unit_vectors(clips[i : i + batch_size], bf16=bf16)[0] for i in range(0, len(clips), batch_size)]
        v = torch.cat(parts).double().cpu()  # (N, base_dim)
        centre = v.mean(0)
        self.centre.copy_(centre.float())
        if self.config.library_norm == "centre+whiten":
            c = F.normalize(v - centre, dim=-1)
            cov = c.T @ c / len(c)  # (D, D)
            eigval, eigvec = torch.linalg.eigh(cov)
            eps = shrinkage * float(eigval.clamp_min(0).sum()) / max(1, min(len(c), len(centre)))
            inv_sqrt = (eigval.clamp_min(0) + eps).rsqrt()
            self.whiten.copy_((eigvec * inv_sqrt) @ eigvec.T)


# What a fresh install serves until something is trained (``app.learn.registry``): the
# deterministic initialisation at 64 px (the cpu-small presets' size), not the
# specification's 224. Chosen on the retrieval benchmark's dev parts over three seeds
# (README, "The untrained encoder's frame size"): 64 px scored recall@1 0.696 against
# 0.644 at 224 and 0.630 at 112, µAP 0.595 against 0.547 and 0.579, recall@5 0.933
# against 0.948, for a twelfth of the forward pass's arithmetic, which is what a cold event
# and a backfill wait for beside decoding. Its frame descriptors carry 16 x 16 thumbnails
# (frame_thumbnail), chosen on the same dev parts: recall@1 0.770 against 0.711 without,
# mAP 0.837 against 0.804, µAP 0.638 against 0.612 (README, "Thumbnails in the frame
# descriptors"), in their mirror components (frame_thumbnail_mirrors), matched under
# mirror images, since six seeds' dev parts chose that over the folded thumbnails before
# it: recall@1 0.878 against 0.807, mAP 0.918 against 0.874, µAP 0.715 against 0.705 (README,
# "Mirror-matched thumbnails"). Its served vector carries the clips' mean thumbnails at
# weight 0.5 (video_thumbnail_weight), chosen on six seeds' dev parts with 200
# distractors in each library: recall@1 0.819 against 0.748, mAP 0.873 against 0.806,
# µAP 0.633 against 0.549, and the first stage's recall@16 0.952 against 0.796 (README,
# "A library of hundreds: distractors").
INITIAL_CONFIG = EncoderConfig(
    frame_size=64, frame_thumbnail=16, frame_thumbnail_mirrors=True, video_thumbnail_weight=0.5
)


def initial_encoder(config: EncoderConfig, seed: int = 0) -> VideoEncoder:
    """A deterministic, untrained encoder: the same weights on every machine."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = VideoEncoder(config)
    finally:
        torch.random.set_rng_state(state)
    return _for_inference(model)


def _for_inference(model: VideoEncoder) -> VideoEncoder:
    model.backbone.to(memory_format=torch.channels_last)  # faster convolutions on CPU
    return model.eval()


def save_checkpoint(path: Path, model: VideoEncoder, *, extra: dict[str, Any] | None = None) -> Path:
    """Writes {config, state_dict, extra} to a temporary name, then renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": model.config.to_dict(), "state_dict": model.state_dict(), **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: Path, map_location: str = "cpu") -> tuple[VideoEncoder, dict[str, Any]]:
    """Loads a checkpoint written by :func:`save_checkpoint`; returns (model, payload)."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = VideoEncoder(EncoderConfig.from_dict(payload["config"]))
    state = dict(payload["state_dict"])
    # Checkpoints from before library normalisation: not fitted.
    state.setdefault("centre", torch.zeros_like(model.centre))
    state.setdefault("whiten", torch.eye(len(model.centre)))
    # Checkpoints from before frame descriptors: the untrained (fixed orthogonal) head.
    state.setdefault("frame_head.weight", model.frame_head.weight.detach().clone())
    model.load_state_dict(state)
    return _for_inference(model), payload
