"""Probe videos and sample frames from them, without trusting the file.

Videos come from the open web, so every byte of a file is treated as hostile. Decoders
(decord 0.6.0 in particular) can segfault, hang or allocate without bound on crafted
input, so **no decoder runs in the calling process**: each call starts a throwaway child
(``python -m app.media.child``, spawned by :mod:`app.media.sandbox`) that

1. sets resource limits on itself (address space, CPU seconds, output file size, no core
   dumps) and dies with its parent (:mod:`app.media.child`);
2. probes the file with PyAV and refuses, before decoding anything, what exceeds
   :class:`DecodeLimits` (size, streams, resolution, duration) or is not a video at all;
3. reads the video's geometry from a few keyframes: its rotation metadata, and the
   borders (letterbox, pillarbox, padding, blurred side-bars) around the picture
   (:mod:`app.media.geometry`);
4. decodes only the chosen frames with decord, upright, resized while decoding so that
   the picture inside the borders fills the frame, and sends them to the parent on a
   pipe, a chunk of frames at a time as they decode (:mod:`app.media.decode`), so that
   the parent can embed the first frames while the child decodes the next
   (:func:`stream_frames`); its result and log go to a temporary directory that the
   parent owns and removes.

The parent enforces the wall-clock timeout (covering the whole stream) by killing the
child's whole process group, caps the bytes of frames it accepts, and turns every
failure (the child's own refusal, a signal, running out of memory, a timeout) into a
:class:`VideoError` whose ``reason`` is one line an operator can read.

The child imports this module (for the dataclasses), numpy, PyAV and decord, never torch
or the settings, so that starting it stays cheap.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import numpy as np

from app.media import sandbox
from app.media.geometry import Box

if TYPE_CHECKING:
    from app.config import Settings

__all__ = [
    "Box",
    "DecodeLimits",
    "FrameStream",
    "Sample",
    "VideoError",
    "VideoInfo",
    "decode_limits",
    "probe",
    "sample_frames",
    "stream_frames",
]


class VideoError(Exception):
    """A video that cannot be used.

    ``reason`` is one readable line for operators, e.g. ``'not a video: no video stream'``,
    ``'decode timed out after 120 s'``, ``'resolution 16384x16384 exceeds limit 8847360
    pixels'``. It never contains the file's path (reasons may reach API clients); the path
    is logged instead.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodeLimits:
    """What a video may declare, and what the decoding child may use."""

    timeout_s: float = 120.0  # wall clock for the whole child, start-up included
    memory_mb: int = 4096  # RLIMIT_AS of the child process
    max_seconds: float = 4 * 3600  # declared duration limit
    max_pixels: int = 4096 * 2160  # width*height limit
    max_streams: int = 16
    max_bytes: int = 2 * 1024**3  # file size limit


def decode_limits(settings: Settings) -> DecodeLimits:
    """The limits the settings give every probe and decode (``VIDSIM_DECODE_*``, ``VIDSIM_MAX_*``)."""
    return DecodeLimits(
        timeout_s=settings.decode_timeout_s,
        memory_mb=settings.decode_memory_mb,
        max_seconds=settings.max_video_seconds,
        max_pixels=settings.max_video_pixels,
        max_streams=settings.max_video_streams,
        max_bytes=settings.max_download_bytes,
    )


@dataclass(frozen=True)
class VideoInfo:
    """What the container declares about its (best) video stream.

    From :func:`probe`, ``frame_count`` is the container's count, or duration x fps where
    the container has none. From :func:`sample_frames`, ``frame_count`` is the number of
    frames decord indexed, and ``duration_s`` spans the first frame's start to the last
    frame's end.
    """

    duration_s: float
    width: int
    height: int
    fps: float
    frame_count: int
    codec: str
    size_bytes: int


@dataclass(frozen=True)
class Sample:
    """Frames sampled from a video.

    ``frames``: (T, size, size, 3) uint8 RGB. ``timestamps``: (T,) float64, the presentation
    time of each returned frame in seconds from the video's first frame (non-decreasing;
    the same frame may repeat when the video has fewer frames than the sampling rate).

    ``rotation``: degrees counter-clockwise the stored frames were turned to stand upright
    (the stream's display matrix; 0, 90, 180 or 270). ``crop``: the picture the frames were
    taken from, inside any borders, in pixels of the upright stored frame (``info.width``
    x ``info.height``, swapped for a rotation of 90 or 270); the whole frame when no
    border was found, None when borders were not looked for.
    """

    info: VideoInfo
    frames: np.ndarray
    timestamps: np.ndarray
    rotation: int = 0
    crop: Box | None = None


def probe(path: str | Path, *, limits: DecodeLimits = DecodeLimits()) -> VideoInfo:
    """Read what a video declares (duration, size, fps, codec), in a throwaway child.

    ``path`` is a local path or a ``file://`` URI. Raises :class:`VideoError` if the file is
    missing, is not a video, or declares more than ``limits`` allow. Decodes no frame
    (except what FFmpeg needs to learn the stream's parameters).
    """
    local = _local_path(path)
    check_file(local, limits)
    with tempfile.TemporaryDirectory(prefix="vidsim-decode-") as tmp:
        try:
            result = sandbox.run_child({"op": "probe", "path": str(local)}, limits, out=Path(tmp))
        except sandbox.ChildFailed as exc:
            raise VideoError(exc.reason) from None
    return VideoInfo(**result["info"])


def sample_frames(
    path: str | Path,
    *,
    fps: float = 1.0,
    size: int = 224,
    max_frames: int = 64,
    start_s: float | None = None,
    duration_s: float | None = None,
    crop_borders: bool | None = None,
    limits: DecodeLimits = DecodeLimits(),
) -> Sample:
    """Sample ``fps`` frames per second of video time, resized and centre-cropped.

    The span is ``[start_s, start_s + duration_s)`` (clipped to the video) if given, else
    the whole video; times are seconds from the first frame. A span of S seconds yields
    ``ceil(S * fps)`` frames (at least 1, even for a video shorter than one period) at
    ``start + k / fps``; if that is more than ``max_frames``, ``max_frames`` frames evenly
    spaced over the span instead. Each target time takes the frame being shown then.

    Frames are turned upright (rotation metadata), cut to the picture inside any borders
    (with ``crop_borders``; None: the ``VIDSIM_CROP_BORDERS`` setting, on by default), then
    scaled so the picture's short side is ``size`` (keeping the display aspect ratio) and
    centre-cropped: ``Sample.frames`` is (T, size, size, 3) uint8 RGB. Borders are found
    on the whole video whatever the span, so every span of one video is cut alike.

    Raises :class:`VideoError` for anything wrong with the video (missing, not a video,
    over ``limits``, undecodable, decoder crash, timeout), :class:`ValueError` for bad
    arguments. Probing and decoding run in a child process (see the module docstring).
    This is :func:`stream_frames` consumed whole.
    """
    stream = stream_frames(
        path,
        fps=fps,
        size=size,
        max_frames=max_frames,
        start_s=start_s,
        duration_s=duration_s,
        crop_borders=crop_borders,
        limits=limits,
    )
    with stream:
        return stream.sample()


def stream_frames(
    path: str | Path,
    *,
    fps: float = 1.0,
    size: int = 224,
    max_frames: int = 64,
    start_s: float | None = None,
    duration_s: float | None = None,
    crop_borders: bool | None = None,
    limits: DecodeLimits = DecodeLimits(),
    chunk_frames: int = 8,
    decode_threads: int = 0,
) -> FrameStream:
    """:func:`sample_frames`' frames as the child decodes them, ``chunk_frames`` at a time.

    ::

        with stream_frames(path, fps=1.0, size=224) as stream:
            for chunk in stream:  # (n, size, size, 3) uint8, n <= chunk_frames, in order
                ...
            sample = stream.sample()  # all the frames, their times, the video's info

    The arguments are :func:`sample_frames`'; argument errors raise :class:`ValueError`
    here, everything else :class:`VideoError` from the iteration or :meth:`FrameStream.sample`
    (a file that turns out undecodable halfway raises after the chunks before). Leaving
    the ``with`` block kills a child still running; ``limits.timeout_s`` covers the whole
    stream, however long the caller takes over each chunk. ``decode_threads``: the
    decoder's threads (0: FFmpeg chooses, one per core).
    """
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size!r}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames!r}")
    if start_s is not None and not (start_s >= 0 and math.isfinite(start_s)):
        raise ValueError(f"start_s must be >= 0, got {start_s!r}")
    if duration_s is not None and not (duration_s > 0):
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames!r}")
    if decode_threads < 0:
        raise ValueError(f"decode_threads must be >= 0, got {decode_threads!r}")

    if crop_borders is None:
        # Read here rather than passed by every caller: library videos and queries must
        # all be cut alike, or copies of one picture would embed differently.
        from app.config import get_settings

        crop_borders = get_settings().crop_borders
    local = _local_path(path)
    check_file(local, limits)
    request = {
        "op": "sample",
        "path": str(local),
        "fps": float(fps),
        "size": int(size),
        "max_frames": int(max_frames),
        "start_s": None if start_s is None else float(start_s),
        "duration_s": None if duration_s is None else float(duration_s),
        "crop_borders": bool(crop_borders),
        "chunk_frames": int(chunk_frames),
        "decode_threads": int(decode_threads),
    }
    return FrameStream(request, limits)


class FrameStream:
    """The frames of one sample arriving from the decoding child (see :func:`stream_frames`).

    A context manager; iterating it yields each chunk once, (n, size, size, 3) uint8
    (writable, the stream's own memory). :meth:`sample` reads whatever is left and
    returns the whole :class:`Sample`.
    """

    def __init__(self, request: dict[str, Any], limits: DecodeLimits) -> None:
        self._request = request
        self._limits = limits
        self._size: int = request["size"]
        self._max_frames: int = request["max_frames"]
        self._chunks: list[np.ndarray] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._child: sandbox.ChildStream | None = None
        self._iterated = False
        self._result: dict[str, Any] | None = None

    def __enter__(self) -> FrameStream:
        self._tmp = tempfile.TemporaryDirectory(prefix="vidsim-decode-")
        try:
            frame_bytes = self._size * self._size * 3
            self._child = sandbox.ChildStream(
                self._request, self._limits, out=Path(self._tmp.name), max_bytes=self._max_frames * frame_bytes
            ).__enter__()
        except BaseException:
            self._tmp.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._child is not None:
                self._child.close()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._child is None:
            raise RuntimeError("iterate a FrameStream inside its with block")
        if self._iterated:
            raise RuntimeError("a FrameStream is iterated once")
        self._iterated = True
        try:
            for payload in self._child.chunks():
                chunk = _chunk_frames(payload, self._size)
                self._chunks.append(chunk)
                yield chunk
            # The end of the stream: whether it ended well is the child's result. Read
            # here, so that a failure reaches whoever iterates before they use the frames.
            self._result = self._child.result()
        except sandbox.ChildFailed as exc:
            raise VideoError(exc.reason) from None

    def sample(self) -> Sample:
        """All the frames (those iterated and the rest), their times and the video's info."""
        if self._child is None:
            raise RuntimeError("call FrameStream.sample() inside its with block")
        if not self._iterated:
            for _ in self:
                pass
        result = self._result
        if result is None:  # iterated, but not to the end
            raise RuntimeError("FrameStream.sample() after an iteration left unfinished")
        if not self._chunks:
            raise VideoError("decoder returned no frames")
        frames = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]  # (T, size, size, 3)
        timestamps = np.asarray(result["timestamps"], dtype=np.float64)  # (T,)
        if timestamps.shape != (frames.shape[0],):
            raise VideoError(f"decoder returned {timestamps.shape} timestamps for {frames.shape}")
        crop = None if result.get("crop") is None else Box(**result["crop"])
        return Sample(
            info=VideoInfo(**result["info"]),
            frames=frames,
            timestamps=timestamps,
            rotation=int(result.get("rotation", 0)),
            crop=crop,
        )


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _local_path(path: str | Path) -> Path:
    """An absolute local path from a path or a ``file://`` URI; other URLs are refused.

    Absolute, because FFmpeg reads ``name:rest`` as protocol ``name`` (``concat:``,
    ``subfile:``, ``http:``...) unless the path starts with ``/``.
    """
    if isinstance(path, str) and _URI_SCHEME.match(path):
        parts = urlsplit(path)
        if parts.scheme.lower() != "file":
            raise VideoError(f"unsupported URL scheme {parts.scheme!r}: only local paths and file:// URIs")
        if parts.netloc not in ("", "localhost"):
            raise VideoError(f"file:// URI on another host ({parts.netloc!r}) is not supported")
        path = unquote(parts.path)
    if not isinstance(path, str | Path):
        raise TypeError(f"path must be str or Path, got {type(path).__name__}")
    if not str(path):
        raise VideoError("file not found")  # Path("") would mean the current directory
    return Path(os.path.abspath(path))


def check_file(path: Path, limits: DecodeLimits) -> int:
    """Refuse what a stat() alone shows to be unusable; returns the size in bytes.

    Runs in the parent (no child is started for a missing file) and again in the child.
    """
    try:
        st = os.stat(path)  # follows symlinks: the target is what would be decoded
    except FileNotFoundError:
        raise VideoError("file not found") from None
    except OSError as exc:
        raise VideoError(f"cannot read file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        # FIFOs and devices could block or never end (/dev/zero).
        raise VideoError("not a regular file")
    if st.st_size == 0:
        raise VideoError("not a video: empty file (0 bytes)")
    if st.st_size > limits.max_bytes:
        raise VideoError(f"file size {st.st_size} bytes exceeds limit {limits.max_bytes} bytes")
    return st.st_size


def _chunk_frames(payload: bytearray, size: int) -> np.ndarray:
    """One chunk from the child as (n, size, size, 3) uint8, sharing ``payload``'s memory.

    The child parsed hostile input: the parent trusts nothing of a chunk but its length,
    which the sandbox has already capped (``max_frames`` frames in all).
    """
    frame_bytes = size * size * 3
    if not payload or len(payload) % frame_bytes:
        raise VideoError(f"decoder returned a malformed chunk of {len(payload)} bytes for {size}x{size} frames")
    return np.frombuffer(payload, dtype=np.uint8).reshape(-1, size, size, 3)
