"""ffmpeg, run quietly: cutting and re-encoding a stretch of a video, and a video's length.

The crawler trims intros and outros with :func:`run_ffmpeg`; the demo corpus and the
retrieval benchmark cut their clips and edited queries with :func:`cut`. The binary is the
system's ``ffmpeg`` where there is one, else the one imageio-ffmpeg ships.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import imageio_ffmpeg


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: the system's, else imageio-ffmpeg's."""
    return shutil.which("ffmpeg") or imageio_ffmpeg.get_ffmpeg_exe()


def run_ffmpeg(args: list[str], *, timeout_s: float = 120.0) -> None:
    """Runs ffmpeg with ``args`` (overwriting outputs, no prompt); raises with the end of its
    stderr if it fails."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")


def cut(
    src: Path,
    dst: Path,
    *,
    start_s: float,
    duration_s: float,
    vf: str | None = None,
    crf: int = 23,
    fps: float | None = None,
    extra: list[str] | None = None,
) -> Path:
    """Cuts [start, start+duration) of ``src`` into an H.264 ``dst``, with an optional
    filter chain (the edits of a copy-detection query)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    filters = [f for f in (vf, f"fps={fps}" if fps else None, "scale=trunc(iw/2)*2:trunc(ih/2)*2") if f]
    run_ffmpeg(
        [
            "-ss", f"{start_s:.3f}", "-t", f"{duration_s:.3f}", "-i", str(src),
            "-vf", ",".join(filters), "-an",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf), "-pix_fmt", "yuv420p",
            *(extra or []),
            str(dst),
        ]
    )  # fmt: skip
    return dst


def duration_of(path: Path) -> float:
    """Length of a video in seconds, from its container (or its video stream's frame count)."""
    import av

    with av.open(str(path)) as container:
        if container.duration:
            return container.duration / 1_000_000
        stream = container.streams.video[0]
        return float(stream.frames / stream.average_rate) if stream.average_rate else 0.0
