"""Generating a benchmark from a folder of videos: probe the sources, plan, then cut the
library clips and edit the queries with ffmpeg, and write ``ground_truth.json``.

- the **library**: clips cut from each input video, several per long source, so that
  near-identical scenes of one source are hard distractors for each other;
- **positive queries**: a sub-segment of a library clip under one or two VSC22-style
  edits (:mod:`app.evaluate.edits`, and *insertion*: the copy placed between two pieces
  of a video that is not in the library);
- **negative queries**: edited clips of material held *out* of the library (whole
  sources, and segments of library sources that were not cut into it), with no match;
- **distractors** (optional): whole videos of other footage that no query copies, in the
  library beside the clips, as a real library holds many videos besides the copied ones:
  without them a part's library is a few dozen clips, where every candidate is re-ranked
  and the first stage is never tested.

The sources are split into a development and a test part first
(:func:`app.evaluate.plan.split_sources`); each part gets its own library clips, queries
and negatives, and every file is recorded with its sha256 (:mod:`.ground_truth`).
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from app.evaluate.edits import DEFAULT_EDITS, combine_edits
from app.evaluate.ground_truth import (
    FORMAT_VERSION,
    GROUND_TRUTH,
    PARTS,
    TEST,
    GroundTruth,
    LibraryClip,
    Query,
    SourceRecord,
)
from app.evaluate.plan import Filler, QueryPlan, Source, plan_benchmark
from app.media import video as video_io
from app.media.ffmpeg import cut, run_ffmpeg
from app.media.register import file_sha256

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".ogv", ".ts"})


def _find_videos(videos: Sequence[Path] | Path) -> list[Path]:
    if isinstance(videos, str | Path) and Path(videos).is_dir():
        found = sorted(p for p in Path(videos).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    elif isinstance(videos, str | Path):
        found = [Path(videos)]
    else:
        found = []
        for v in videos:
            found.extend(_find_videos(Path(v)) if Path(v).is_dir() else [Path(v)])
    return found


def _probe_sources(paths: list[Path]) -> list[Source]:
    sources: list[Source] = []
    names: set[str] = set()
    for path in paths:
        try:
            info = video_io.probe(path)
        except video_io.VideoError as exc:
            logger.warning("skipping %s: %s", path, exc.reason)
            continue
        if info.duration_s < 1.0:
            logger.warning("skipping %s: %.2f s is too short", path, info.duration_s)
            continue
        sources.append(Source(_unique_name(path.stem, names), path.resolve(), info.duration_s))
    return sources


def _unique_name(stem: str, taken: set[str], *, prefix: str = "") -> str:
    """``prefix`` + ``stem`` made safe for file names and ids, numbered if ``taken``
    holds it already; added to ``taken``."""
    name = base = prefix + "".join(c if c.isalnum() or c in "-_" else "_" for c in stem.lower())
    n = 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def _fingerprint(path: Path) -> dict[str, Any]:
    """What the reuse check compares of an input video (cheap: no hashing); the ground
    truth records each file's content hash too."""
    st = path.stat()
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _content(path: Path) -> dict[str, Any]:
    """A file's content fingerprint, as the ground truth records it."""
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def generate(
    videos: Sequence[Path] | Path,
    out_dir: Path,
    *,
    seed: int = 0,
    segment_s: float = 4.0,
    queries_per_video: int = 15,
    negatives: int = 30,
    edits: Sequence[str] = DEFAULT_EDITS,
    max_segments_per_video: int = 15,
    holdout_sources: int | None = None,
    holdout_fraction: float = 0.2,
    two_edit_prob: float = 0.4,
    distractors: Sequence[Path] | Path = (),
    distractors_per_part: int | None = None,
    show_progress: bool = True,
    console: Console | None = None,
) -> Path:
    """Makes a benchmark from ``videos`` (files, or folders searched for videos) in
    ``out_dir``; returns the path of its ``ground_truth.json``.

    The sources are split by source into a ``dev`` and a ``test`` part (deterministic
    from ``seed``), each planned as a benchmark of its own. Each source is cut into
    segments of ``segment_s`` seconds. Sources with 3 or more segments keep
    ``holdout_fraction`` of them (at least one) out of the library, and at most
    ``max_segments_per_video`` go in. ``holdout_sources`` whole sources of each part
    (default: a quarter of them when the part has 4 or more; the ones with fewest
    segments) stay out of the library entirely. Each library source gets
    ``queries_per_video`` positive queries, and ``negatives`` negative queries (shared
    between the parts) are cut from the held-out material. Each query has one edit from
    ``edits``, or two with probability ``two_edit_prob``. ``distractors`` (files, or
    folders searched for videos) join the libraries whole, dealt between the parts in an
    order drawn from ``seed``, at most ``distractors_per_part`` in each (default: all).

    Deterministic given the sources and ``seed``. A benchmark already in ``out_dir`` with
    the same sources and parameters is reused.
    """
    unknown = [e for e in edits if e not in DEFAULT_EDITS]
    if unknown or not edits:
        raise ValueError(f"unknown edits {unknown}; choose from {list(DEFAULT_EDITS)}")
    out_dir = Path(out_dir).resolve()
    gt_path = out_dir / GROUND_TRUTH
    started = time.perf_counter()
    sources = _probe_sources(_find_videos(videos))
    if not sources:
        raise ValueError(f"no usable videos in {videos}")
    params = {
        "seed": seed, "segment_s": segment_s, "queries_per_video": queries_per_video,
        "negatives": negatives, "edits": list(edits),
        "max_segments_per_video": max_segments_per_video, "holdout_sources": holdout_sources,
        "holdout_fraction": holdout_fraction,
        "two_edit_prob": two_edit_prob,
    }  # fmt: skip
    spec = {
        "version": FORMAT_VERSION,
        "params": params,
        "sources": [_fingerprint(s.path) for s in sources],
    }
    extras = _deal_distractors(
        _find_videos(distractors) if distractors else [], seed=seed, per_part=distractors_per_part
    )
    if extras:  # (a benchmark without them keeps the spec it had)
        params["distractors_per_part"] = distractors_per_part
        spec["distractors"] = [{**_fingerprint(path), "part": part} for path, part in extras]
    if gt_path.exists():
        try:
            old = GroundTruth.load(gt_path)
        except (OSError, KeyError, ValueError):
            old = None
        files = [c.path for c in old.library] + [q.path for q in old.queries] if old else []
        if old and old.spec == spec and all(f.exists() for f in files):
            logger.info("benchmark in %s is up to date", out_dir)
            return gt_path

    plan = plan_benchmark(
        sources,
        out_dir=out_dir,
        seed=seed,
        segment_s=segment_s,
        queries_per_video=queries_per_video,
        negatives=negatives,
        edits=tuple(edits),
        max_segments_per_video=max_segments_per_video,
        holdout_sources=holdout_sources,
        holdout_fraction=holdout_fraction,
        two_edit_prob=two_edit_prob,
    )
    console = console or Console(stderr=True)
    library: list[LibraryClip] = []
    queries: list[Query] = []
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=not show_progress,
    )  # fmt: skip
    with progress:
        task = progress.add_task("cutting library", total=len(plan.library) + len(plan.queries) + len(extras))
        for clip_id, span in plan.library:
            src = sources[span.source]
            dst = out_dir / "library" / f"{clip_id}.mp4"
            cut(src.path, dst, start_s=span.start_s, duration_s=span.duration_s)
            library.append(
                LibraryClip(clip_id, dst, src.name, round(span.start_s, 3), round(span.duration_s, 3),
                            part=plan.parts[span.source], **_content(dst))
            )  # fmt: skip
            progress.advance(task)
        progress.update(task, description="editing queries")
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            for q in plan.queries:
                dst = out_dir / "queries" / f"{q.id}.mp4"
                origin = q.origin or sources[q.source].path
                _make_query(q, origin, dst, Path(tmp), seed=seed)
                queries.append(
                    Query(q.id, dst, "+".join(q.edits), q.positive, sources[q.source].name,
                          round(q.start_s, 3), round(q.duration_s, 3), part=q.part, **_content(dst))
                )  # fmt: skip
                progress.advance(task)
        progress.update(task, description="adding distractors")
        taken = {c.id for c in library}
        for path, part in extras:
            clip = _add_distractor(path, part, out_dir / "distractors", taken=taken)
            if clip is not None:
                library.append(clip)
            progress.advance(task)
    records = [SourceRecord(s.name, part, **_content(s.path)) for s, part in zip(sources, plan.parts, strict=True)]
    GroundTruth(library, queries, spec, records).save(gt_path)
    n_neg, n_distractors = sum(q.positive is None for q in queries), sum(c.distractor for c in library)
    logger.info(
        "benchmark: %d library clips from %d sources (test part: %s) and %d distractors, %d queries (%d negatives)"
        " in %.1f s",
        len(library) - n_distractors, len(sources), ", ".join(r.name for r in records if r.part == TEST) or "none",
        n_distractors, len(queries), n_neg, time.perf_counter() - started,
    )  # fmt: skip
    return gt_path


def _deal_distractors(paths: list[Path], *, seed: int, per_part: int | None) -> list[tuple[Path, str]]:
    """Each distractor with its part: the videos in an order drawn from ``seed``, dealt
    to the parts in turn, at most ``per_part`` to each."""
    order = sorted({p.resolve() for p in paths})
    random.Random(f"distractors-{seed}").shuffle(order)
    dealt = [(path, PARTS[i % len(PARTS)]) for i, path in enumerate(order)]
    if per_part is not None:
        dealt = dealt[: per_part * len(PARTS)]
    return dealt


def _add_distractor(path: Path, part: str, folder: Path, *, taken: set[str]) -> LibraryClip | None:
    """The library clip of one distractor, copied whole into ``folder`` (so the benchmark
    holds its own files), its id not in ``taken`` (then added); None, logged, for a video
    that does not probe."""
    try:
        info = video_io.probe(path)
    except video_io.VideoError as exc:
        logger.warning("skipping distractor %s: %s", path, exc.reason)
        return None
    clip_id = _unique_name(path.stem, taken, prefix="distractor-")
    dst = folder / f"{clip_id}{path.suffix.lower()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dst)
    return LibraryClip(clip_id, dst, clip_id, 0.0, round(info.duration_s, 3), part=part, distractor=True,
                       **_content(dst))  # fmt: skip


def _make_query(q: QueryPlan, origin: Path, dst: Path, tmp: Path, *, seed: int) -> None:
    edit = combine_edits(q.edits)
    if q.filler is None:
        cut(
            origin,
            dst,
            start_s=q.start_s,
            duration_s=q.duration_s,
            vf=edit.vf,
            crf=edit.crf,
            fps=edit.fps,
        )
        return
    segment = cut(
        origin, tmp / f"{q.id}-copy.mp4", start_s=q.start_s, duration_s=q.duration_s,
        vf=edit.vf, crf=edit.crf, fps=edit.fps,
    )  # fmt: skip
    _insert(segment, q.filler, dst, seed=seed + int(q.id[1:]))


def _insert(segment: Path, filler: Filler, dst: Path, *, seed: int) -> None:
    """``dst`` = filler before, the copy, filler after: every part re-scaled (letterboxed)
    to the copy's size and frame rate, then concatenated."""
    import av

    with av.open(str(segment)) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = float(stream.average_rate or 25)
    if filler.path is None:
        pattern = f"life=s={width}x{height}:r={rate:g}:seed={seed}:mold=10:ratio=0.2"
        pre = ["-f", "lavfi", "-t", f"{filler.pre_s:.3f}", "-i", pattern]
        post = [
            "-f",
            "lavfi",
            "-t",
            f"{filler.post_s:.3f}",
            "-i",
            pattern.replace(f"seed={seed}", f"seed={seed + 1}"),
        ]
    else:
        pre = ["-ss", f"{filler.start_s:.3f}", "-t", f"{filler.pre_s:.3f}", "-i", str(filler.path)]
        post = [
            "-ss",
            f"{filler.start_s + filler.pre_s:.3f}",
            "-t",
            f"{filler.post_s:.3f}",
            "-i",
            str(filler.path),
        ]
    fit = (
        f"scale={width}:{height}:force_original_aspect_ratio=decrease,"
        f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2:black,setsar=1,fps={rate:g},format=yuv420p"
    )
    graph = f"[0:v]{fit}[a];[1:v]{fit}[b];[2:v]{fit}[c];[a][b][c]concat=n=3:v=1:a=0[v]"
    dst.parent.mkdir(parents=True, exist_ok=True)
    run_ffmpeg(
        [*pre, "-i", str(segment), *post, "-filter_complex", graph, "-map", "[v]", "-an",
         "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", str(dst)]
    )  # fmt: skip
