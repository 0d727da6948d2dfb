"""What finding borders costs: `sample_frames` of 60-s 640x360 videos with border cutting
on and off, alternated in the same run, with the child's own phase timings.

    python -m scripts.bench_geometry --repeats 5

Videos (H.264, 25 fps, moving texture): ``plain`` (x264's default keyframe interval),
``letterbox`` (the picture shrunk to 480x270 in black bars: found and cut, so the frames
decode larger), ``one-gop`` (a single keyframe: detection decodes from the start instead).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from app.media.ffmpeg import run_ffmpeg
from app.media.video import sample_frames

_TEXTURE = "life=size=160x90:rate=25:ratio=0.5:mold=10:seed=7:life_color=#00ff00:death_color=#aa00aa"
_ENCODE = ["-an", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
VIDEOS = {
    "plain": ("scale=640:360", []),
    "letterbox": ("scale=480:270,pad=640:360:80:45:black", []),
    "one-gop": ("scale=640:360", ["-g", "2000", "-sc_threshold", "0"]),
}


class _Phases(logging.Handler):
    """Collects the decoding child's phase timings from app.media.sandbox's debug log."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("decoder child") and isinstance(record.args, tuple):
            timings = record.args[-1]  # the phases come last
            self.last = dict(timings) if isinstance(timings, dict) else {}


def main(*, repeats: int = 5, size: int = 224) -> dict[str, dict[str, Any]]:
    phases = _Phases()
    sandbox_log = logging.getLogger("app.media.sandbox")
    sandbox_log.addHandler(phases)
    sandbox_log.setLevel(logging.DEBUG)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vidsim-bench-geometry-") as tmp:
        for name, (vf, extra) in VIDEOS.items():
            path = Path(tmp) / f"{name}.mp4"
            run_ffmpeg(["-t", "60", "-f", "lavfi", "-i", _TEXTURE, "-vf", vf, *_ENCODE, *extra, str(path)])
            runs: dict[bool, list[tuple[float, dict[str, float]]]] = {True: [], False: []}
            crop = None
            for _ in range(repeats):
                for on in (False, True):  # alternated: load on the machine falls on both alike
                    t = time.perf_counter()
                    sample = sample_frames(path, size=size, crop_borders=on)
                    runs[on].append((time.perf_counter() - t, phases.last))
                    crop = sample.crop if on else crop
            row: dict[str, Any] = {"crop": crop}
            for on, label in ((False, "off"), (True, "on")):
                row[f"wall_{label}_ms"] = statistics.median(w for w, _ in runs[on]) * 1000
                for phase in ("geometry", "open", "decode"):
                    row[f"{phase}_{label}_ms"] = statistics.median(p.get(phase, 0.0) for _, p in runs[on]) * 1000
            results[name] = row
    sandbox_log.removeHandler(phases)
    return results


def _print(results: dict[str, dict[str, Any]]) -> None:
    print(f"{'video':<10} {'crop':<34} {'wall off':>9} {'wall on':>9} {'geom off':>9} {'geom on':>9} "
          f"{'decode off':>10} {'decode on':>10}")  # fmt: skip
    for name, r in results.items():
        crop = r["crop"]
        box = f"{crop.x},{crop.y} {crop.width}x{crop.height}" if crop else "-"
        print(
            f"{name:<10} {box:<34} {r['wall_off_ms']:>8.0f}ms {r['wall_on_ms']:>8.0f}ms "
            f"{r['geometry_off_ms']:>8.1f}ms {r['geometry_on_ms']:>8.1f}ms "
            f"{r['decode_off_ms'] + r['open_off_ms']:>9.0f}ms {r['decode_on_ms'] + r['open_on_ms']:>9.0f}ms"
        )
    print("geometry: the child's border finding (on) or rotation read (off); decode: decord's open + decode")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    _print(main(repeats=args.repeats, size=args.size))
