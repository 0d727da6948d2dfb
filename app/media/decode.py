"""What the decoding child does with the file: probe it with PyAV, decode frames with decord.

Runs only inside the child (:mod:`app.media.child`), under its resource limits. The probe
reads what the container declares and refuses, before anything is decoded, what exceeds
:class:`~app.media.video.DecodeLimits` or is not a video; a sample then decodes only the
frames shown at the target times, resized while decoding (upright, inside any borders
:mod:`app.media.geometry` found), and sends them to the parent chunk by chunk as they
are decoded, so that the parent can work on the first frames while later ones decode.
A refusal is :class:`Refused`, with a reason that never contains the file's path.

PyAV and decord are imported here, lazily and timed; never torch.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from app.logs import one_line
from app.media.geometry import Geometry, crop_box, read_geometry
from app.media.video import DecodeLimits, VideoInfo, check_file

# Container formats the probe accepts (FFmpeg demuxer names). Anything else is refused
# before decord sees it: playlist demuxers (hls, concat...) would make FFmpeg open other
# files or URLs named inside the "video".
_ALLOWED_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,flv,ogg,mpeg,asf,m4v,h264,hevc,gif"


class Refused(Exception):
    """Raised in the child with a readable reason; becomes a VideoError in the parent."""


def clean_message(exc: BaseException, path: str) -> str:
    """First meaningful line of a decoder exception, without the file's path."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    # decord: "[12:00:00] /github/workspace/src/video/....cc:151: Check failed: ..."
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+?:\d+: ", "", str(text)).strip()
    line = next((ln for ln in text.splitlines() if ln.strip()), text)
    if path:
        line = line.replace(path, "<file>")
    return one_line(line, 200)


# Frames per chunk sent to the parent when the request names none.
CHUNK_FRAMES = 8

Send = Callable[[memoryview], None]


def run_request(
    request: dict[str, Any], limits: DecodeLimits, send: Send, timings: dict[str, float], t: float
) -> dict[str, Any]:
    """Probe (and for ``op == "sample"``, decode) the request's file; return the result dict.

    A sample's frames go to ``send``, ``request["chunk_frames"]`` at a time (the last
    chunk may be shorter), each a C-contiguous (n, size, size, 3) uint8 buffer, in
    order. ``timings`` collects each phase's seconds, the first one counted from ``t``. Raises
    :class:`Refused` (or :class:`~app.media.video.VideoError`) for an unusable file and
    MemoryError when the decoder ran out of memory.
    """
    path: str = request["path"]
    size_bytes = check_file(Path(path), limits)
    import av
    import av.logging

    t = _lap(timings, "import_av", t)
    sampling = request["op"] == "sample"
    find_borders = bool(request.get("crop_borders")) if sampling else None
    try:
        info, sar, geometry = _probe_with_av(av, path, limits, size_bytes, find_borders=find_borders, timings=timings)
    finally:
        t = _lap(timings, "probe", t)
        if "geometry" in timings:  # timed on its own inside the probe
            timings["probe"] = round(timings["probe"] - timings["geometry"], 4)
    if geometry is None:
        return {"ok": True, "info": asdict(info)}

    import decord
    from decord._ffi.base import DECORDError

    t = _lap(timings, "import_decord", t)
    try:
        return _decode(decord, request, limits, info, sar, geometry, send, timings, t)
    except (RuntimeError, DECORDError) as exc:
        # decord raises RuntimeError at open but DECORDError (not a RuntimeError) while
        # reading; both mean the file cannot be decoded.
        msg = clean_message(exc, path)
        if looks_like_oom(msg):
            raise MemoryError from None
        raise Refused(f"cannot decode: {msg}") from None


def looks_like_oom(message: str) -> bool:
    """Whether a decoder's error message means it ran out of memory."""
    # Under RLIMIT_AS, running out of memory surfaces as text: "Cannot allocate memory"
    # (ENOMEM), "Resource temporarily unavailable" (EAGAIN: no room for a thread's stack),
    # "failed to map segment from shared object" (an import), "std::bad_alloc" (C++).
    message = message.lower()
    return any(s in message for s in _OOM_MARKERS)


_OOM_MARKERS = (
    "cannot allocate memory",
    "resource temporarily unavailable",
    "failed to map segment",
    "bad_alloc",
)


def _lap(timings: dict[str, float], name: str, t: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - t, 4)
    return now


def _probe_with_av(
    av: Any,
    path: str,
    limits: DecodeLimits,
    size_bytes: int,
    *,
    find_borders: bool | None,
    timings: dict[str, float],
) -> tuple[VideoInfo, float, Geometry | None]:
    """Read the container's declarations with PyAV and refuse what exceeds the limits.

    Returns (VideoInfo, sample aspect ratio as float, geometry). The geometry (rotation,
    and borders if ``find_borders``) is read from a few keyframes while the container is
    open, unless ``find_borders`` is None (a probe alone): then it is None.
    """
    av.logging.set_level(av.logging.ERROR)  # for Capture below; the log is our own
    container_options = {"protocol_whitelist": "file", "format_whitelist": _ALLOWED_FORMATS}
    # max_pixels (given to every stream's decoder) stops FFmpeg from decoding a huge frame
    # while it learns the streams' parameters (avformat_find_stream_info decodes a few).
    options = {"max_pixels": str(limits.max_pixels)}
    try:
        with av.logging.Capture() as logs:
            container = av.open(
                path,
                options=options,
                container_options=container_options,
                metadata_errors="ignore",
            )
    except av.error.ArgumentError:
        # EINVAL from avformat_open_input here means the probed format is not allowed.
        raise Refused("not a video: unsupported container format") from None
    except av.FFmpegError as exc:
        message = clean_message(exc, path)
        if looks_like_oom(message):
            raise MemoryError from None
        raise Refused(f"not a video: {message}") from None
    with container:
        if len(container.streams) > limits.max_streams:
            raise Refused(f"too many streams: {len(container.streams)} (limit {limits.max_streams})")
        videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not videos:
            if container.streams.video:
                raise Refused("not a video: only a cover image, no video stream")
            raise Refused("not a video: no video stream")
        # The stream decord will pick (av_find_best_stream), unless it is cover art.
        best = container.streams.best("video")
        vs = best if best in videos else videos[0]
        ctx = vs.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width <= 0 or height <= 0:
            # With max_pixels set, FFmpeg zeroes a size over the limit; its log says which.
            for _level, _name, message in logs:
                m = re.search(r"Picture size (\d+)x(\d+) (?:exceeds|is invalid)", message)
                if m:
                    width, height = int(m[1]), int(m[2])
                    break
            else:
                raise Refused("not a video: the video stream has no picture size")
        if width * height > limits.max_pixels:
            raise Refused(f"resolution {width}x{height} exceeds limit {limits.max_pixels} pixels")

        durations = []
        if container.duration:
            durations.append(container.duration / 1e6)  # AV_TIME_BASE units
        if vs.duration and vs.time_base:
            durations.append(float(vs.duration * vs.time_base))
        # The longest declaration counts: a file must not escape the limit by lying in one
        # place. Unknown duration is checked again on decord's frame index.
        duration = max(durations, default=0.0)
        if not math.isfinite(duration) or duration > limits.max_seconds:
            raise Refused(f"duration {duration:.0f} s exceeds limit {limits.max_seconds:.0f} s")
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        fps = float(rate) if rate else 0.0
        frame_count = int(vs.frames or 0) or round(duration * fps)
        sar_ratio = vs.sample_aspect_ratio
        sar = float(sar_ratio) if sar_ratio and 0.1 <= float(sar_ratio) <= 10 else 1.0
        info = VideoInfo(
            duration_s=duration,
            width=width,
            height=height,
            fps=fps,
            frame_count=frame_count,
            codec=str(ctx.name or "unknown"),
            size_bytes=size_bytes,
        )
        geometry = None
        if find_borders is not None:
            t = time.perf_counter()
            try:
                geometry = read_geometry(container, vs, duration_s=duration, fps=fps, find_borders=find_borders)
            except av.FFmpegError as exc:  # frames the index promised are not there
                message = clean_message(exc, path)
                if looks_like_oom(message):
                    raise MemoryError from None
                raise Refused(f"cannot decode: {message}") from None
            _lap(timings, "geometry", t)
    return info, sar, geometry


# Widths decord returns frames of another size at, whatever the video and the height
# ("Check failed: from_size == to_size" when they are copied out: the frame came back
# wider than asked). Measured on this decord for every width from 1 to 700 px; a pixel
# wider decodes right and still holds the square.
_MISSIZED_WIDTHS = frozenset({1, 2, 3, 4, 6, 8, 12, 16, 24, 48, 72})


def _decode_plan(info: VideoInfo, sar: float, geometry: Geometry, size: int) -> tuple[int, int, int, int]:
    """(w, h) to decode at, and (x, y) of the size x size square to keep from each frame.

    The *displayed* picture (upright, sample aspect ratio applied) is scaled so that the
    short side of its crop is ``size`` (aspect kept), and the square is the crop's centre.
    """
    display_w, display_h = info.width * sar, float(info.height)
    if geometry.rotation in (90, 270):  # decord turns frames upright: the sides swap
        display_w, display_h = display_h, display_w
    left, top, right, bottom = geometry.crop
    crop_w, crop_h = (right - left) * display_w, (bottom - top) * display_h
    scale = size / min(crop_w, crop_h)
    # Rounded so that the crop (rounded alike) holds the square whatever the rounding.
    w = max(round(display_w * scale), size)
    h = max(round(display_h * scale), size)
    if w in _MISSIZED_WIDTHS:
        w += 1
    x0, x1 = round(left * w), max(round(right * w), round(left * w) + size)
    y0, y1 = round(top * h), max(round(bottom * h), round(top * h) + size)
    x = min(x0 + (x1 - x0 - size) // 2, w - size)
    y = min(y0 + (y1 - y0 - size) // 2, h - size)
    return w, h, x, y


def _sample_times(
    video_end: float, fps: float, max_frames: int, start_s: float | None, duration_s: float | None
) -> np.ndarray:
    """Target times (N,) in seconds from the first frame; N >= 1."""
    start = start_s or 0.0
    if start >= video_end:
        raise Refused(f"window starts at {start:g} s, after the end of the video ({video_end:.2f} s)")
    end = video_end if duration_s is None else min(start + duration_s, video_end)
    span = end - start
    # The small epsilon keeps float noise (e.g. 60.000001 s) from adding a frame.
    n = max(1, math.ceil(span * fps - 1e-6))
    if n <= max_frames:
        return start + np.arange(n) / fps
    return start + np.arange(max_frames) * (span / max_frames)


def _decode(
    decord: Any,
    request: dict[str, Any],
    limits: DecodeLimits,
    info: VideoInfo,
    sar: float,
    geometry: Geometry,
    send: Send,
    timings: dict[str, float],
    t: float,
) -> dict[str, Any]:
    size = request["size"]
    rw, rh, x0, y0 = _decode_plan(info, sar, geometry, size)
    # Resizing inside decord's filter graph is cheaper than decoding full frames and
    # resizing them afterwards. num_threads=0 lets FFmpeg choose.
    threads = int(request.get("decode_threads") or 0)
    vr = decord.VideoReader(request["path"], ctx=decord.cpu(0), width=rw, height=rh, num_threads=threads)
    t = _lap(timings, "open", t)
    n = len(vr)
    if n == 0:
        raise Refused("not a video: no decodable frames")
    ts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)  # (n, 2)
    # Frame start times, seconds from the first frame. decord keeps them as float32: round
    # off the noise (0.36000001 -> 0.36).
    starts = np.round(ts[:, 0] - ts[0, 0], 6)
    video_end = max(float(ts[-1, 1] - ts[0, 0]), float(starts.max()))
    if video_end <= 0:  # a single frame without a duration
        video_end = 1.0 / info.fps if info.fps > 0 else 1e-3
    if video_end > limits.max_seconds:  # containers without a declared duration
        raise Refused(f"duration {video_end:.0f} s exceeds limit {limits.max_seconds:.0f} s")
    targets = _sample_times(
        video_end,
        request["fps"],
        request["max_frames"],
        request["start_s"],
        request["duration_s"],
    )
    # The frame shown at each target time: the last one starting at or before it (give or
    # take 1 ms: float32 times are that coarse at 4 h, and 0.4 s must find a frame at 0.4).
    order = np.argsort(starts, kind="stable")
    pos = np.searchsorted(starts[order], targets + 1e-3, side="right") - 1
    pos = np.clip(pos, 0, n - 1)
    indices = order[pos]  # (T,)
    t = _lap(timings, "index", t)
    _send_frames(vr, indices, (rh, rw), (x0, y0, size), int(request.get("chunk_frames") or CHUNK_FRAMES), send, timings)
    del vr
    sampled_info = VideoInfo(
        duration_s=video_end,
        width=info.width,
        height=info.height,
        fps=info.fps if info.fps > 0 else n / video_end,
        frame_count=n,
        codec=info.codec,
        size_bytes=info.size_bytes,
    )
    upright_w, upright_h = (info.height, info.width) if geometry.rotation in (90, 270) else (info.width, info.height)
    crop = asdict(crop_box(geometry, upright_w, upright_h)) if request.get("crop_borders") else None
    return {
        "ok": True,
        "info": asdict(sampled_info),
        "timestamps": starts[indices].tolist(),
        "rotation": geometry.rotation,
        "crop": crop,
    }


def _send_frames(
    vr: Any,
    indices: np.ndarray,
    shape: tuple[int, int],
    square: tuple[int, int, int],
    chunk: int,
    send: Send,
    timings: dict[str, float],
) -> None:
    """Decode the frames ``indices`` (T,) name and send their squares, ``chunk`` at a time.

    Each chunk decodes its distinct frames once, in file order (decord seeks less that
    way); a frame repeated across a chunk boundary (a video with fewer frames than the
    sampling rate) is kept from the chunk before rather than decoded again.
    """
    rh, rw = shape
    x0, y0, size = square
    kept: dict[int, np.ndarray] = {}
    decode_s = send_s = 0.0
    for start in range(0, len(indices), chunk):
        wanted = indices[start : start + chunk].tolist()
        missing = sorted(set(wanted) - kept.keys())
        t = time.perf_counter()
        if missing:
            batch = vr.get_batch(missing).asnumpy()  # (U, rh, rw, 3) uint8 RGB
            if batch.shape[1:] != (rh, rw, 3):
                raise Refused(f"decoder returned frames {batch.shape[1:]}, expected {(rh, rw, 3)}")
            kept.update(zip(missing, batch, strict=True))
        squares = np.stack([kept[i][y0 : y0 + size, x0 : x0 + size] for i in wanted])  # (n, size, size, 3)
        kept = {i: kept[i] for i in wanted}
        t2 = time.perf_counter()
        send(squares.data.cast("B"))
        decode_s += t2 - t
        send_s += time.perf_counter() - t2
    # "send" is mostly time spent waiting for the parent to take a chunk (a full pipe).
    timings["decode"], timings["send"] = round(decode_s, 4), round(send_s, 4)
