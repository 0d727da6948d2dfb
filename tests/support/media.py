"""Real test videos, encoded with ffmpeg (the binary that imageio-ffmpeg ships).

Plain functions, not fixtures, so any test module can use them::

    from tests.media import make_video, make_hostile_files  # tests/ a package
    from support.media import make_video, make_hostile_files  # tests/ without __init__.py

Everything is small and fast to encode: a few tens of milliseconds per file.
"""

from __future__ import annotations

import functools
import random
import struct
import subprocess
import uuid
from pathlib import Path

__all__ = ["HOSTILE_BUT_VALID", "HOSTILE_REASONS", "ffmpeg_exe", "make_hostile_files", "make_video", "run_ffmpeg"]

# Keys of make_hostile_files() whose files are awkward but valid: they must decode.
HOSTILE_BUT_VALID = frozenset({"vfr"})
# The refusal each other key of make_hostile_files() gets, as a regex: from the decoder
# (tests/test_video.py) and, after "video <id>: ", in a worker's answer (tests/test_hostile.py).
HOSTILE_REASONS = {
    "truncated": r"^not a video: ",
    "truncated_faststart": r"^cannot decode: ",  # the probe reads the intact index
    "zero_byte": r"^not a video: empty file \(0 bytes\)$",
    "random_bytes": r"^not a video: ",
    "text": r"^not a video: ",
    "playlist": r"^not a video: ",
    "audio_only": r"^not a video: no video stream$",
    "huge_resolution": r"^resolution 16000x16000 exceeds limit 8847360 pixels$",
    "huge_resolution_16384": r"^resolution 16384x16384 exceeds limit 8847360 pixels$",
    "long_duration": r"^duration 86400 s exceeds limit 14400 s$",
    "many_streams": r"^too many streams: 40 \(limit 16\)$",
}


@functools.cache
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg (there is no system ffmpeg)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def run_ffmpeg(*args: str | Path) -> None:
    """Run ffmpeg quietly; raise with its stderr if it fails."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")


def _codec_args(codec: str) -> list[str]:
    if codec in ("libx264", "h264"):
        # veryfast keeps B-frames (ultrafast has none), like real uploads; yuv420p is what
        # players and decoders expect (a 4:4:4 source would otherwise give High 4:4:4).
        return ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
    return ["-c:v", codec]


def make_video(
    path: str | Path,
    *,
    seconds: float = 4.0,
    width: int = 320,
    height: int = 240,
    fps: float = 25,
    pattern: str = "testsrc2",
    codec: str = "libx264",
    extra_vf: str | None = None,
    source: str | Path | None = None,
    source_start_s: float = 0.0,
    extra_args: tuple[str, ...] = (),
) -> Path:
    """Encode a real video and return its path.

    ``pattern`` is an ffmpeg lavfi video source (``testsrc2``, ``mandelbrot``, ``smptebars``,
    ``color=c=blue``...); size and rate are appended to its options. ``extra_vf`` is an
    extra filter chain (e.g. ``drawbox=...`` or ``setpts=...``). With ``source``, the
    video is cut from that file instead (``seconds`` from ``source_start_s``, re-encoded
    with ``codec``; ``width``/``height``/``fps``/``pattern`` are then ignored: scale with
    ``extra_vf``). ``seconds`` is source time: a ``setpts`` in ``extra_vf`` may make the
    result longer or shorter. ``extra_args`` go before the output path (e.g. ``-movflags
    +faststart``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        inputs = ["-ss", f"{source_start_s:g}", "-t", f"{seconds:g}", "-i", str(source)]
    else:
        sep = ":" if "=" in pattern else "="
        spec = f"{pattern}{sep}size={width}x{height}:rate={fps:g}"
        # -t as an input option rather than a source's duration option (not every source
        # has one); on the input, it counts source time, before extra_vf retimes frames.
        inputs = ["-t", f"{seconds:g}", "-f", "lavfi", "-i", spec]
    vf = ["-vf", extra_vf] if extra_vf else []
    run_ffmpeg(*inputs, *vf, "-an", *_codec_args(codec), *extra_args, path)
    return path


def make_hostile_files(directory: str | Path) -> dict[str, Path]:
    """Files that a decoder must survive, keyed by kind; about half a second to make.

    All must be refused with a readable error, except the keys in ``HOSTILE_BUT_VALID``
    (awkward but valid files that must decode):

    - ``truncated``: a real mp4 cut in half (index at the end, so it is lost);
    - ``truncated_faststart``: the same with the index first, so frame data is missing;
    - ``zero_byte``, ``random_bytes`` (named .mp4), ``text`` (a text file named .mp4);
    - ``audio_only``: an AAC sine tone in .m4a;
    - ``playlist``: an HLS playlist named .mp4 (FFmpeg would open what it names);
    - ``huge_resolution``: a 16x16 PNG-in-QuickTime video whose headers (tkhd, sample
      entry, every PNG IHDR) are patched to declare 16000x16000;
    - ``huge_resolution_16384``: the same at 16384x16384 (beyond FFmpeg's own size check);
    - ``long_duration``: a real 24 h H.264 video: 100 frames at one frame per 864 s;
    - ``many_streams``: 40 tiny video streams in one Matroska file;
    - ``vfr`` (valid): 2 s at 25 fps then 10 s at 5 fps, with B-frames.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    whole = make_video(d / "whole.mp4", seconds=2, width=160, height=120)
    data = whole.read_bytes()
    files["truncated"] = d / "truncated.mp4"
    files["truncated"].write_bytes(data[: len(data) // 2])
    fast = make_video(
        d / "whole_faststart.mp4",
        seconds=2,
        width=160,
        height=120,
        extra_args=("-movflags", "+faststart"),
    )
    data = fast.read_bytes()
    files["truncated_faststart"] = d / "truncated_faststart.mp4"
    files["truncated_faststart"].write_bytes(data[: len(data) // 2])

    files["zero_byte"] = d / "zero_byte.mp4"
    files["zero_byte"].write_bytes(b"")
    files["random_bytes"] = d / "random_bytes.mp4"
    files["random_bytes"].write_bytes(random.Random(1234).randbytes(64 * 1024))
    files["text"] = d / "text.mp4"
    files["text"].write_text("This is not a video.\n" * 200)
    files["playlist"] = d / "playlist.mp4"
    files["playlist"].write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{whole}\n#EXT-X-ENDLIST\n")

    files["audio_only"] = d / "audio_only.m4a"
    run_ffmpeg(
        "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", files["audio_only"]
    )  # fmt: skip

    png = d / "png16.mov"
    make_video(png, seconds=0.2, width=16, height=16, codec="png", extra_args=("-f", "mov"))
    files["huge_resolution"] = _patch_png_mov_size(png, d / "huge_resolution.mp4", 16000, 16000)
    files["huge_resolution_16384"] = _patch_png_mov_size(png, d / "huge_resolution_16384.mp4", 16384, 16384)

    files["long_duration"] = d / "long_duration.mp4"
    run_ffmpeg(
        "-f", "lavfi", "-i", "color=c=gray:size=16x16:rate=1/864", "-t", "86400",
        *_codec_args("libx264"), files["long_duration"],
    )  # fmt: skip

    files["many_streams"] = d / "many_streams.mkv"
    maps = [arg for _ in range(40) for arg in ("-map", "0:v")]
    run_ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=16x16:rate=5", "-t", "1", *maps, "-c:v", "mpeg4",
        files["many_streams"],
    )  # fmt: skip

    files["vfr"] = make_video(
        d / "vfr.mp4",
        seconds=4,
        extra_vf="setpts='if(lt(N,50),N/25,2+(N-50)/5)/TB'",
        extra_args=("-fps_mode", "passthrough"),
    )
    return files


def _patch_png_mov_size(src: Path, dst: Path, width: int, height: int) -> Path:
    """Copy a PNG-in-QuickTime video, declaring width x height everywhere it is stored.

    Cheap way to a "resolution bomb" header: the track header (16.16 fixed point), the
    sample entry (16-bit) and each frame's PNG IHDR chunk (32-bit; CRC left stale, which
    FFmpeg does not check by default). The pixel data stays 16x16.
    """
    data = bytearray(src.read_bytes())
    tkhd = data.index(b"tkhd")
    version = data[tkhd + 4]
    # version/flags, times/track id/duration, reserved, layer, group, volume, reserved, matrix
    offset = tkhd + 4 + 4 + (20 if version == 0 else 32) + 8 + 2 + 2 + 2 + 2 + 36
    struct.pack_into(">II", data, offset, width << 16, height << 16)
    entry = data.index(b"png ", data.index(b"stsd"))
    # sample entry: reserved(6) data_ref(2) version(2) revision(2) vendor(4) temporal and
    # spatial quality(8), then width(2) height(2)
    struct.pack_into(">HH", data, entry + 4 + 24, width, height)
    start = 0
    while (ihdr := data.find(b"IHDR", start)) >= 0:
        struct.pack_into(">II", data, ihdr + 4, width, height)
        start = ihdr + 4
    dst.write_bytes(bytes(data))
    return dst


def own_hue() -> str:
    """An ``extra_vf`` giving a test video content no other test's video has: the registry
    keeps one video per content (SHA-256), so the same bytes made by another test would be
    that test's video, registered already, perhaps embedded, in another collection."""
    return f"hue=h={uuid.uuid4().int % 340 + 10}"
