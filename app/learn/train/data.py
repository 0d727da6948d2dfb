"""Training data: pairs of augmented windows cut from videos, and the stream of keys that
feeds them to a DataLoader.

For each video, two random windows of ``frames / fps`` seconds are sampled at ``fps``
frames per second (decoded with decord inside the DataLoader's worker processes), each
augmented with one draw applied to all its frames (:mod:`app.learn.augment`).

Decoding runs in worker processes, never in the trainer: decord must not be imported
before torch nor share a reader across a fork (decord#251, #294). decord hard-crashes or
hangs on some corrupt files, so training data should be files that passed the
preprocessing probe (:func:`app.media.video.probe`); what still fails to decode is
skipped with a logged reason (and the training loop survives a worker that dies or hangs).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from app.learn.augment import ClipAugment, TimeWarp
from app.learn.train.config import TrainConfig
from app.logs import one_line

logger = logging.getLogger(__name__)

# Windows are decoded with the short side this much larger than frame_size, so that a
# random resized crop of 30% of the frame is not upsampled as much.
_DECODE_OVERSAMPLE = 1.25
# How many decord readers each loader worker keeps open (small libraries reuse them).
_READER_CACHE = 32


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
    - ``times``: (2, T) float32, the moment of the video each frame shows, seconds (NaN
      for frames of unrelated footage inserted): the frame-level objective pairs the two
      views' frames of the same moments;
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
        view_shift_s: float | None = None,
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
        self.view_shift_s = view_shift_s
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
                views, mask, times = self._sample(path, index, gen)
                return {"views": views, "mask": mask, "times": times, "video": index, "skipped": skipped}
            except SkippedVideo as exc:
                reason = str(exc)
                if path not in self._bad:
                    self._bad[path] = reason
                    skipped.append((path, reason))
                    logger.debug("skipping %s: %s", path, reason)  # the trainer logs it once
            index = int(torch.randint(len(self.videos), (), generator=gen))
        return {"views": None, "mask": None, "times": None, "video": -1, "skipped": skipped}

    def _sample(self, path: str, index: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reader = self._reader(path)
        t = self.frames
        warps = [augment.draw_time(t, generator=gen) for augment in self.augment]
        first, valid_a = self._window_times(reader, gen, warps[0])
        around = first[0] if self.view_shift_s is not None else None
        second, valid_b = self._window_times(reader, gen, warps[1], around=around)
        times, valid = [first, second], [valid_a, valid_b]
        clip = _decode(reader, np.concatenate(times), path, self._drop_reader)  # (2T, 3, h, w)
        params = [a.draw(clip.shape[-2], clip.shape[-1], generator=gen) for a in self.augment]
        other = None
        if any(p.mix is not None or w.inserted for p, w in zip(params, warps, strict=True)):
            other = self._unrelated(index, gen)  # (T, 3, h', w') or None
            if other is not None:  # the clip's size, so that its crop box fits it too
                resized = torch.nn.functional.interpolate(other.float(), size=clip.shape[-2:], mode="bilinear")
                other = resized.round().clamp(0, 255).to(torch.uint8)
        views, masks, shown = [], [], []
        for v, (augment, p, warp) in enumerate(zip(self.augment, params, warps, strict=True)):
            view = augment.apply(clip[v * t : (v + 1) * t], p, other)  # (T, 3, S, S)
            moments = torch.from_numpy(times[v]).float()  # (T,)
            if warp.inserted and other is not None:
                lo, hi = warp.inserted[0], warp.inserted[0] + warp.inserted[1]
                view[lo:hi] = augment.apply(other, dataclasses.replace(p, mix=None))[lo:hi]
                moments[lo:hi] = float("nan")
            views.append(view)
            mask = torch.zeros(t, dtype=torch.bool)
            mask[: valid[v]] = True
            masks.append(mask)
            shown.append(moments)
        return torch.stack(views), torch.stack(masks), torch.stack(shown)  # (2, T, 3, S, S), (2, T), (2, T)

    def _unrelated(self, index: int, gen: torch.Generator) -> torch.Tensor | None:
        """A window of another video (unrelated footage for picture-in-picture, blending and
        insertion), (T, 3, h, w) uint8; None if there is no other video or it fails."""
        if len(self.videos) < 2:
            return None
        other = (index + 1 + int(torch.randint(len(self.videos) - 1, (), generator=gen))) % len(self.videos)
        path = self.videos[other]
        try:
            if path in self._bad:
                return None
            reader = self._reader(path)
            times, _ = self._window_times(reader, gen, TimeWarp())
            return _decode(reader, times, path, self._drop_reader)
        except SkippedVideo:
            return None

    def _window_times(
        self, reader: _Reader, gen: torch.Generator, warp: TimeWarp, *, around: float | None = None
    ) -> tuple[np.ndarray, int]:
        """Target times (T,) of one window, and how many of them are real frames. With
        ``around``, the window starts within ``view_shift_s`` of it; ``warp``'s speed
        change and dropped frames apply where the window fits the video."""
        t, end = self.frames, reader.end_s
        period = warp.speed / self.fps if end >= t * warp.speed / self.fps else 1.0 / self.fps

        def uniform(hi: float) -> float:
            return max(0.0, hi) * float(torch.rand((), generator=gen))

        if end >= t * period:  # the window fits: a random start
            if around is None:
                start = uniform(end - t * period)
            else:
                shift = self.view_shift_s or 0.0
                start = min(max(0.0, around - shift + uniform(2 * shift)), end - t * period)
            times = start + np.arange(t) * period
            for k in warp.held:  # a dropped frame: the one before it shown again
                times[k] = times[k - 1]
            return times, t
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


def _decode(reader: _Reader, times: np.ndarray, path: str, drop: Any) -> torch.Tensor:
    """The frames shown at ``times`` (N,) as (N, 3, h, w) uint8: each distinct frame
    decoded once, in file order. A decoder error drops the reader and skips the video."""
    # The frame shown at each target time: the last one starting at or before it.
    pos = np.searchsorted(reader.starts[reader.order], times + 1e-3, side="right") - 1
    indices = reader.order[np.clip(pos, 0, len(reader.order) - 1)]  # (N,)
    unique, inverse = np.unique(indices, return_inverse=True)
    try:
        batch = reader.vr.get_batch(unique.tolist()).asnumpy()  # (U, h, w, 3) uint8
    except Exception as exc:  # decord: RuntimeError or DECORDError (not a RuntimeError)
        drop(path)
        raise SkippedVideo(f"cannot decode frames: {one_line(exc)}") from None
    if batch.ndim != 4 or batch.shape[0] != len(unique) or batch.shape[-1] != 3:
        raise SkippedVideo(f"decoder returned frames of shape {batch.shape}")
    return torch.from_numpy(batch[inverse.reshape(-1)]).permute(0, 3, 1, 2)  # (N, 3, h, w)


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
    """Stacks the samples that have views: ``views`` (B, 2, T, 3, S, S), ``mask`` and
    ``times`` (B, 2, T), ``video`` (B,); ``skipped`` gathers every sample's skipped videos."""
    good = [s for s in samples if s["views"] is not None]
    skipped = [pair for s in samples for pair in s["skipped"]]
    if not good:
        return {"views": None, "mask": None, "times": None, "video": torch.zeros(0, dtype=torch.long),
                "skipped": skipped}  # fmt: skip
    return {
        "views": torch.stack([s["views"] for s in good]),
        "mask": torch.stack([s["mask"] for s in good]),
        "times": torch.stack([s["times"] for s in good]),
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
        items = cast("Dataset[int]", range(num_items))  # only its length matters to the sampler
        self._inner: DistributedSampler[int] = DistributedSampler(
            items, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
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


def _worker_init(worker_id: int) -> None:
    # Loader workers share the cores with the trainer: one thread each for torch ops.
    torch.set_num_threads(1)


def make_loader(
    dataset: WindowDataset, sampler: EpochSampler, batch_size: int, config: TrainConfig, device: torch.device
) -> DataLoader:
    """The loader of one stretch of ``sampler``'s stream: full batches of ``batch_size``
    (this rank's share), decoded in ``config.num_workers`` worker processes."""
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
