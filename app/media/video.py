"""Probe videos and sample frames from them, without trusting the file.

Videos come from the open web, so every byte of a file is treated as hostile. Decoders
(decord 0.6.0 in particular, see FIELD-NOTES "Decoding") can segfault, hang or allocate
without bound on crafted input, so **no decoder runs in the calling process**: each call
starts a throwaway child (``python -m app.media.video``) that

1. sets resource limits on itself (address space, CPU seconds, output file size, no core
   dumps) and dies with its parent;
2. probes the file with PyAV and refuses, before decoding anything, what exceeds
   :class:`DecodeLimits` (size, streams, resolution, duration) or is not a video at all;
3. decodes only the chosen frames with decord, resized while decoding, and writes them as
   a ``.npy`` into a temporary directory that the parent owns and removes.

The parent enforces the wall-clock timeout by killing the child's whole process group and
turns every failure (the child's own refusal, a signal, running out of memory, a timeout)
into a :class:`VideoError` whose ``reason`` is one line an operator can read.

The child only imports numpy, PyAV and decord (never torch) so that starting it stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from app.files import write_atomic
from app.logs import one_line

logger = logging.getLogger(__name__)

__all__ = ["DecodeLimits", "Sample", "VideoError", "VideoInfo", "probe", "sample_frames"]

# Container formats the probe accepts (FFmpeg demuxer names). Anything else is refused
# before decord sees it: playlist demuxers (hls, concat...) would make FFmpeg open other
# files or URLs named inside the "video".
_ALLOWED_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,flv,ogg,mpeg,asf,m4v,h264,hevc,gif"
_RESULT_FILE = "result.json"
_FRAMES_FILE = "frames.npy"
_LOG_FILE = "child.log"
_MAX_RESULT_BYTES = 1 << 20
# Child exit status when it ran out of memory and could not even write its result.
_EXIT_OOM = 86
# Room for the child's log and result on top of the frames, for RLIMIT_FSIZE.
_FSIZE_SLACK = 64 * 1024**2


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
    """

    info: VideoInfo
    frames: np.ndarray
    timestamps: np.ndarray


# --------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------


def probe(path: str | Path, *, limits: DecodeLimits = DecodeLimits()) -> VideoInfo:
    """Read what a video declares (duration, size, fps, codec), in a throwaway child.

    ``path`` is a local path or a ``file://`` URI. Raises :class:`VideoError` if the file is
    missing, is not a video, or declares more than ``limits`` allow. Decodes no frame
    (except what FFmpeg needs to learn the stream's parameters).
    """
    local = _local_path(path)
    _check_file(local, limits)
    result = _run_child({"op": "probe", "path": str(local)}, limits, frames_bytes=0)
    return VideoInfo(**result["info"])


def sample_frames(
    path: str | Path,
    *,
    fps: float = 1.0,
    size: int = 224,
    max_frames: int = 64,
    start_s: float | None = None,
    duration_s: float | None = None,
    limits: DecodeLimits = DecodeLimits(),
) -> Sample:
    """Sample ``fps`` frames per second of video time, resized and centre-cropped.

    The span is ``[start_s, start_s + duration_s)`` (clipped to the video) if given, else
    the whole video; times are seconds from the first frame. A span of S seconds yields
    ``ceil(S * fps)`` frames (at least 1, even for a video shorter than one period) at
    ``start + k / fps``; if that is more than ``max_frames``, ``max_frames`` frames evenly
    spaced over the span instead. Each target time takes the frame being shown then.

    Frames are scaled so the short side is ``size`` (keeping the display aspect ratio),
    then centre-cropped: ``Sample.frames`` is (T, size, size, 3) uint8 RGB.

    Raises :class:`VideoError` for anything wrong with the video (missing, not a video,
    over ``limits``, undecodable, decoder crash, timeout), :class:`ValueError` for bad
    arguments. Probing and decoding run in a child process (see the module docstring).
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

    local = _local_path(path)
    _check_file(local, limits)
    request = {
        "op": "sample",
        "path": str(local),
        "fps": float(fps),
        "size": int(size),
        "max_frames": int(max_frames),
        "start_s": None if start_s is None else float(start_s),
        "duration_s": None if duration_s is None else float(duration_s),
    }
    frames_bytes = max_frames * size * size * 3
    result = _run_child(request, limits, frames_bytes=frames_bytes)
    frames: np.ndarray = result["frames"]  # (T, size, size, 3), checked by _load_frames
    timestamps = np.asarray(result["timestamps"], dtype=np.float64)  # (T,)
    if timestamps.shape != (frames.shape[0],):
        raise VideoError(f"decoder returned {timestamps.shape} timestamps for {frames.shape}")
    return Sample(info=VideoInfo(**result["info"]), frames=frames, timestamps=timestamps)


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


def _check_file(path: Path, limits: DecodeLimits) -> int:
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


# Environment variables the child inherits. The rest (database URLs, webhook secrets...)
# stay out of the process that parses hostile input.
_CHILD_ENV_KEEP = (
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _CHILD_ENV_KEEP or k.startswith("LC_")}
    # Make `-m app.media.video` importable whatever the caller's working directory.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # One BLAS thread (numpy is imported for the .npy only), and few malloc arenas so that
    # per-thread arenas do not eat the RLIMIT_AS budget with reservations.
    env["OPENBLAS_NUM_THREADS"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["MALLOC_ARENA_MAX"] = "2"
    return env


def _run_child(request: dict[str, Any], limits: DecodeLimits, *, frames_bytes: int) -> dict:
    """Run one request in a child; return its result dict (frames loaded) or raise."""
    request = {**request, "limits": asdict(limits), "parent_pid": os.getpid()}
    request["fsize_limit"] = frames_bytes + _FSIZE_SLACK
    path = request["path"]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vidsim-decode-") as tmp:
        out = Path(tmp)
        timed_out = False
        with open(out / _LOG_FILE, "wb") as log:
            # A new session: the child leads its own process group, which is killed as a
            # whole on timeout, and terminal signals meant for the parent do not reach it.
            # cwd is the private temp dir, so `-m` puts nothing else on the child's path.
            proc = subprocess.Popen(
                [sys.executable, "-m", "app.media.video", "--child", json.dumps(request), str(out)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=out,
                env=_child_env(),
                start_new_session=True,
            )
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Also reached on exceptions raised into this thread while waiting (e.g.
                # Celery's SoftTimeLimitExceeded): never leave a decoder running.
                if proc.returncode is None:
                    _kill_group(proc)
        wall = time.perf_counter() - t_start
        if timed_out:
            logger.warning("decode of %s timed out after %.1f s, killed", path, wall)
            raise VideoError(f"decode timed out after {limits.timeout_s:g} s")

        result = _read_result(out)
        if result is not None:
            logger.debug(
                "decoder child for %s: %.3f s wall, peak RSS %s MB, phases %s",
                path,
                wall,
                result.get("max_rss_mb"),
                result.get("timings"),
            )
        if result is not None and result.get("ok"):
            if request["op"] == "sample":
                result["frames"] = _load_frames(out / _FRAMES_FILE, request["max_frames"], request["size"])
            return result

        reason = _failure_reason(proc.returncode, result, out, limits)
        logger.info("video %s refused: %s (%.2f s)", path, reason, wall)
        raise VideoError(reason)


def _load_frames(path: Path, max_frames: int, size: int) -> np.ndarray:
    """Load the child's (T, size, size, 3) uint8 .npy, checking its header first.

    The child parsed hostile input: a header is not trusted to size an allocation, and
    allow_pickle=False keeps the file to plain data.
    """
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_2_0 if version >= (2, 0) else fmt.read_array_header_1_0
            shape, fortran_order, dtype = read_header(f)
            if (
                dtype != np.uint8
                or fortran_order
                or len(shape) != 4
                or tuple(shape[1:]) != (size, size, 3)
                or not 1 <= shape[0] <= max_frames
            ):
                raise VideoError(f"decoder returned malformed frames {dtype}{shape}")
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise VideoError(f"decoder returned unreadable frames: {exc}") from None


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_result(out: Path) -> dict | None:
    result_path = out / _RESULT_FILE
    try:
        if result_path.stat().st_size > _MAX_RESULT_BYTES:
            return None
        data = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _log_tail(out: Path, limit: int = 4096) -> str:
    try:
        with open(out / _LOG_FILE, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _failure_reason(rc: int, result: dict | None, out: Path, limits: DecodeLimits) -> str:
    """One readable line for a child that did not succeed."""
    oom = f"decoder ran out of memory (limit {limits.memory_mb} MB)"
    if result is not None and result.get("kind") == "oom":
        return oom
    if result is not None and isinstance(result.get("reason"), str):
        return one_line(result["reason"], 300)
    tail = _log_tail(out)
    if tail:
        logger.debug("decoder child log tail:\n%s", tail)
    if rc == _EXIT_OOM or "MemoryError" in tail or "bad_alloc" in tail:
        return oom
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return "decoder exceeded its CPU time limit"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        if sig == signal.SIGKILL:
            # Not our kill (that is reported as a timeout): most likely the OOM killer.
            return f"decoder was killed (signal {name}; out of memory?)"
        return f"decoder crashed (signal {name})"
    last = next((ln for ln in reversed(tail.strip().splitlines()) if ln.strip()), "")
    return one_line(f"decoder failed (exit status {rc})" + (f": {last}" if last else ""), 300)


# --------------------------------------------------------------------------------------
# Child side: runs in `python -m app.media.video --child REQUEST_JSON OUT_DIR`
# --------------------------------------------------------------------------------------


class _Refused(Exception):
    """Raised in the child with a readable reason; becomes a VideoError in the parent."""


def _child_main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "--child":
        print("usage: python -m app.media.video --child REQUEST_JSON OUT_DIR", file=sys.stderr)
        return 2
    request = json.loads(argv[1])
    out = Path(argv[2])
    timings: dict[str, float] = {}
    t = time.perf_counter()
    _die_with_parent(request["parent_pid"])
    limits = DecodeLimits(**request["limits"])
    _set_rlimits(limits, request["fsize_limit"])
    import faulthandler

    faulthandler.enable()  # a crash leaves a Python traceback in the child's log
    try:
        result = _child_run(request, limits, out, timings, t)
    except (_Refused, VideoError) as exc:
        result = {"ok": False, "kind": "refused", "reason": one_line(str(exc), 300)}
    except MemoryError:
        result = {"ok": False, "kind": "oom"}
    except Exception as exc:  # the parent turns this into a VideoError
        message = _clean_message(exc, request["path"])
        if _looks_like_oom(message):
            result = {"ok": False, "kind": "oom"}
        else:
            reason = f"decoder error: {type(exc).__name__}: {message}"
            result = {"ok": False, "kind": "error", "reason": one_line(reason, 300)}
    result["timings"] = timings
    import resource

    # ru_maxrss is in KiB on Linux: the child's peak resident memory, for the parent's log.
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    try:
        write_atomic(out / _RESULT_FILE, json.dumps(result))  # the parent never reads half a result
    except MemoryError:
        return _EXIT_OOM
    return 0


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this child if the parent dies (e.g. a worker killed by -9)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's timeout still applies
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _set_rlimits(limits: DecodeLimits, fsize_limit: int) -> None:
    import resource

    def cap(which: int, soft: int, hard: int | None = None) -> None:
        # Never raise a limit above what this process already has (not permitted).
        _, cur_hard = resource.getrlimit(which)
        hard = soft if hard is None else hard
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        resource.setrlimit(which, (min(soft, hard), hard))

    cap(resource.RLIMIT_AS, limits.memory_mb * 1024**2)
    # CPU seconds as a backstop for a child the parent can no longer kill: decoding
    # threads may legitimately burn CPU on every core for the whole wall-clock budget.
    cpu_s = math.ceil(limits.timeout_s * max(2, os.cpu_count() or 1)) + 10
    cap(resource.RLIMIT_CPU, cpu_s, cpu_s + 5)  # SIGXCPU at soft, SIGKILL at hard
    # Bounds frames.npy and the log. Python ignores SIGXFSZ: an oversized write fails with
    # EFBIG ("File too large") instead, reported as a decoder error.
    cap(resource.RLIMIT_FSIZE, fsize_limit)
    cap(resource.RLIMIT_CORE, 0)  # a crash on a hostile file needs no core dump


def _clean_message(exc: BaseException, path: str) -> str:
    """First meaningful line of a decoder exception, without the file's path."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    # decord: "[12:00:00] /github/workspace/src/video/....cc:151: Check failed: ..."
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+?:\d+: ", "", str(text)).strip()
    line = next((ln for ln in text.splitlines() if ln.strip()), text)
    if path:
        line = line.replace(path, "<file>")
    return one_line(line, 200)


def _child_run(request: dict, limits: DecodeLimits, out: Path, timings: dict[str, float], t: float) -> dict:
    path: str = request["path"]
    size_bytes = _check_file(Path(path), limits)
    import av
    import av.logging

    t = _lap(timings, "import_av", t)
    try:
        info, sar = _probe_with_av(av, path, limits, size_bytes)
    finally:
        t = _lap(timings, "probe", t)
    if request["op"] == "probe":
        return {"ok": True, "info": asdict(info)}

    import decord
    from decord._ffi.base import DECORDError

    t = _lap(timings, "import_decord", t)
    try:
        return _decode(decord, request, limits, info, sar, out, timings, t)
    except (RuntimeError, DECORDError) as exc:
        # decord raises RuntimeError at open but DECORDError (not a RuntimeError) while
        # reading; both mean the file cannot be decoded.
        msg = _clean_message(exc, path)
        if _looks_like_oom(msg):
            raise MemoryError from None
        raise _Refused(f"cannot decode: {msg}") from None


def _looks_like_oom(message: str) -> bool:
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


def _probe_with_av(av: Any, path: str, limits: DecodeLimits, size_bytes: int):
    """Read the container's declarations with PyAV and refuse what exceeds the limits.

    Returns (VideoInfo, sample aspect ratio as float).
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
        raise _Refused("not a video: unsupported container format") from None
    except av.FFmpegError as exc:
        message = _clean_message(exc, path)
        if _looks_like_oom(message):
            raise MemoryError from None
        raise _Refused(f"not a video: {message}") from None
    with container:
        if len(container.streams) > limits.max_streams:
            raise _Refused(f"too many streams: {len(container.streams)} (limit {limits.max_streams})")
        videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not videos:
            if container.streams.video:
                raise _Refused("not a video: only a cover image, no video stream")
            raise _Refused("not a video: no video stream")
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
                raise _Refused("not a video: the video stream has no picture size")
        if width * height > limits.max_pixels:
            raise _Refused(f"resolution {width}x{height} exceeds limit {limits.max_pixels} pixels")

        durations = []
        if container.duration:
            durations.append(container.duration / 1e6)  # AV_TIME_BASE units
        if vs.duration and vs.time_base:
            durations.append(float(vs.duration * vs.time_base))
        # The longest declaration counts: a file must not escape the limit by lying in one
        # place. Unknown duration is checked again on decord's frame index.
        duration = max(durations, default=0.0)
        if not math.isfinite(duration) or duration > limits.max_seconds:
            raise _Refused(f"duration {duration:.0f} s exceeds limit {limits.max_seconds:.0f} s")
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
    return info, sar


def _resized_dims(width: int, height: int, sar: float, size: int) -> tuple[int, int]:
    """(w, h) to decode at: short side of the *displayed* picture = size, aspect kept."""
    display_w = width * sar
    scale = size / min(display_w, height)
    return max(size, round(display_w * scale)), max(size, round(height * scale))


def _sample_times(
    video_end: float, fps: float, max_frames: int, start_s: float | None, duration_s: float | None
) -> np.ndarray:
    """Target times (N,) in seconds from the first frame; N >= 1."""
    start = start_s or 0.0
    if start >= video_end:
        raise _Refused(f"window starts at {start:g} s, after the end of the video ({video_end:.2f} s)")
    end = video_end if duration_s is None else min(start + duration_s, video_end)
    span = end - start
    # The small epsilon keeps float noise (e.g. 60.000001 s) from adding a frame.
    n = max(1, math.ceil(span * fps - 1e-6))
    if n <= max_frames:
        return start + np.arange(n) / fps
    return start + np.arange(max_frames) * (span / max_frames)


def _decode(
    decord: Any,
    request: dict,
    limits: DecodeLimits,
    info: VideoInfo,
    sar: float,
    out: Path,
    timings: dict[str, float],
    t: float,
) -> dict:
    size = request["size"]
    rw, rh = _resized_dims(info.width, info.height, sar, size)
    # Resizing inside decord's filter graph is cheaper than decoding full frames and
    # resizing them afterwards. num_threads=0 lets FFmpeg choose.
    vr = decord.VideoReader(request["path"], ctx=decord.cpu(0), width=rw, height=rh)
    t = _lap(timings, "open", t)
    n = len(vr)
    if n == 0:
        raise _Refused("not a video: no decodable frames")
    ts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)  # (n, 2)
    # Frame start times, seconds from the first frame. decord keeps them as float32: round
    # off the noise (0.36000001 -> 0.36).
    starts = np.round(ts[:, 0] - ts[0, 0], 6)
    video_end = max(float(ts[-1, 1] - ts[0, 0]), float(starts.max()))
    if video_end <= 0:  # a single frame without a duration
        video_end = 1.0 / info.fps if info.fps > 0 else 1e-3
    if video_end > limits.max_seconds:  # containers without a declared duration
        raise _Refused(f"duration {video_end:.0f} s exceeds limit {limits.max_seconds:.0f} s")
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
    # Decode each distinct frame once, in file order (decord seeks less that way).
    unique, inverse = np.unique(indices, return_inverse=True)
    t = _lap(timings, "index", t)
    batch = vr.get_batch(unique.tolist()).asnumpy()  # (U, rh, rw, 3) uint8 RGB
    del vr
    t = _lap(timings, "decode", t)
    if batch.shape[1:] != (rh, rw, 3):
        raise _Refused(f"decoder returned frames {batch.shape[1:]}, expected {(rh, rw, 3)}")
    y0, x0 = (rh - size) // 2, (rw - size) // 2
    frames = batch[inverse.reshape(-1), y0 : y0 + size, x0 : x0 + size]  # (T, size, size, 3)
    np.save(out / _FRAMES_FILE, np.ascontiguousarray(frames), allow_pickle=False)
    _lap(timings, "save", t)
    sampled_info = VideoInfo(
        duration_s=video_end,
        width=info.width,
        height=info.height,
        fps=info.fps if info.fps > 0 else n / video_end,
        frame_count=n,
        codec=info.codec,
        size_bytes=info.size_bytes,
    )
    return {"ok": True, "info": asdict(sampled_info), "timestamps": starts[indices].tolist()}


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
