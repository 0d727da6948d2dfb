"""A retrieval benchmark for copy detection and similarity, made from any folder of videos.

Three steps, each usable on its own:

1. :func:`generate` turns videos into a benchmark directory with ``ground_truth.json``:

   - the **library**: clips cut from each input video, several per long source, so that
     near-identical scenes of one source are hard distractors for each other;
   - **positive queries**: a sub-segment of a library clip under one or two VSC22-style
     edits (:data:`app.evaluate.edits.EDITS`, a few more here, and *insertion*: the copy placed
     between two pieces of a video that is not in the library);
   - **negative queries**: edited clips of material held *out* of the library (whole
     sources, and segments of library sources that were not cut into it), with no match.

2. :func:`evaluate` scores one system's (queries x library) similarity matrix: recall@1,
   recall@5 and mAP over the queries that have a copy in the library, and VSC22's
   micro-average precision (µAP) over every (query, library clip) pair, negatives included,
   which rewards scores that are comparable across queries.

3. :func:`run` decodes every clip once per frame size (sandboxed, :mod:`app.media.video`), runs
   every :class:`System` on the same data, and writes ``report.json``, ``report.md`` and
   ``report.png``. Systems: trained checkpoints, the untrained network, tiny frames, and a
   per-second perceptual hash.

Ground truth paths are relative to the JSON file, so a benchmark directory can be moved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.evaluate.edits import EDITS, Edit
from app.files import atomic_path, write_atomic
from app.media import video as video_io
from app.media.footage import cut, run_ffmpeg

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EDITS",
    "GroundTruth",
    "LibraryClip",
    "Query",
    "Report",
    "System",
    "encoder_system",
    "evaluate",
    "finetune_on_library",
    "generate",
    "phash_bits",
    "phash_similarity",
    "phash_system",
    "run",
    "tiny_frames_descriptor",
    "tiny_frames_system",
    "vector_system",
]

GROUND_TRUTH = "ground_truth.json"
_FORMAT_VERSION = 1
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".ogv", ".ts"})

# Edits the benchmark adds to app.evaluate.edits.EDITS (VSC22 has them; the demo does not need them).
EXTRA_EDITS: dict[str, Edit] = {
    e.name: e
    for e in (
        Edit("resize", "scale=trunc(iw*0.5/2)*2:trunc(ih*0.35/2)*2"),  # smaller, squashed
        Edit("vflip", "vflip"),
        Edit("slow_down", "setpts=1.5*PTS"),
    )
}
INSERTION = "insertion"
DEFAULT_EDITS: tuple[str, ...] = (*EDITS, *EXTRA_EDITS, INSERTION)
# Two of these in one query would only compound the speed change.
_TEMPORAL = frozenset({"speed_up", "slow_down"})

# Frame size the non-learned baselines decode at (pHash wants 32x32 before its DCT).
SMALL_FRAME = 32


# --------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LibraryClip:
    id: str
    path: Path
    source: str
    start_s: float  # where the clip starts in its source
    duration_s: float


@dataclass(frozen=True)
class Query:
    id: str
    path: Path
    edit: str  # edit names joined by "+", e.g. "hflip+insertion"
    positive: str | None  # the library clip it copies, None for a negative
    source: str
    start_s: float  # the copied stretch: in the library clip (positive) or source (negative)
    duration_s: float

    @property
    def edits(self) -> tuple[str, ...]:
        return tuple(self.edit.split("+"))


@dataclass(frozen=True)
class GroundTruth:
    library: list[LibraryClip]
    queries: list[Query]
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def positives(self) -> list[int | None]:
        """For each query, the library column of its copy, or None."""
        column = {clip.id: i for i, clip in enumerate(self.library)}
        return [None if q.positive is None else column[q.positive] for q in self.queries]

    @classmethod
    def load(cls, path: Path) -> GroundTruth:
        path = Path(path)
        data = json.loads(path.read_text())
        root = path.parent
        library = [
            LibraryClip(c["id"], root / c["path"], c["source"], c["start_s"], c["duration_s"]) for c in data["library"]
        ]
        queries = [
            Query(
                q["id"],
                root / q["path"],
                q["edit"],
                q["positive"],
                q["source"],
                q["start_s"],
                q["duration_s"],
            )
            for q in data["queries"]
        ]
        return cls(library, queries, data.get("spec", {}))

    def save(self, path: Path) -> Path:
        root = Path(path).parent

        def rel(p: Path) -> str:
            return Path(os.path.relpath(p, root)).as_posix()

        data = {
            "version": _FORMAT_VERSION,
            "spec": self.spec,
            "library": [{**dataclasses.asdict(c), "path": rel(c.path)} for c in self.library],
            "queries": [{**dataclasses.asdict(q), "path": rel(q.path)} for q in self.queries],
        }
        return write_atomic(Path(path), json.dumps(data, indent=1).encode())


# --------------------------------------------------------------------------------------
# Generation: a pure plan from (sources, seed), then ffmpeg executes it
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    name: str
    path: Path
    duration_s: float


@dataclass(frozen=True)
class _Span:
    source: int  # index into the sources
    start_s: float
    duration_s: float


@dataclass(frozen=True)
class _Filler:
    """The video a copy is inserted into: [start, start+pre) before it, then
    [start+pre, start+pre+post) after it. ``path`` None means a synthetic pattern."""

    path: Path | None
    start_s: float
    pre_s: float
    post_s: float


@dataclass(frozen=True)
class _QueryPlan:
    id: str
    edits: tuple[str, ...]
    positive: str | None
    source: int
    origin: Path | None  # the library clip a positive is cut from; None: the source itself
    start_s: float
    duration_s: float
    filler: _Filler | None


@dataclass(frozen=True)
class _Plan:
    library: list[tuple[str, _Span]]  # (id, span in its source)
    queries: list[_QueryPlan]


def _plan(
    sources: list[_Source],
    *,
    out_dir: Path,
    seed: int,
    segment_s: float,
    queries_per_video: int,
    negatives: int,
    edits: Sequence[str],
    max_segments_per_video: int,
    holdout_sources: int,
    holdout_fraction: float,
    two_edit_prob: float,
) -> _Plan:
    rng = random.Random(seed)
    slots: list[list[_Span]] = []
    for i, src in enumerate(sources):
        length = min(segment_s, src.duration_s)
        count = max(1, int(src.duration_s // segment_s))
        slots.append([_Span(i, k * length, length) for k in range(count)])

    # Whole sources held out: those with the fewest segments (they add least to the
    # library), ties broken by the seed.
    order = sorted(range(len(sources)), key=lambda i: (len(slots[i]), rng.random()))
    held_sources = set(order[:holdout_sources])
    library: list[tuple[str, _Span]] = []
    by_source: dict[int, list[tuple[str, _Span]]] = {}
    held_out: list[_Span] = []  # of held-out sources
    held_slots: list[_Span] = []  # of library sources, not cut into the library
    for i, spans in enumerate(slots):
        if i in held_sources:
            held_out.extend(spans)
            continue
        n_hold = max(1, round(len(spans) * holdout_fraction)) if len(spans) >= 3 and holdout_fraction > 0 else 0
        hold = set(rng.sample(range(len(spans)), n_hold))
        kept = [k for k in range(len(spans)) if k not in hold]
        if len(kept) > max_segments_per_video:  # spread the kept ones over the source
            step = len(kept) / max_segments_per_video
            spread = {kept[int(j * step)] for j in range(max_segments_per_video)}
            hold |= set(kept) - spread
            kept = sorted(spread)
        held_slots.extend(spans[k] for k in sorted(hold))
        for k in kept:
            clip_id = f"{sources[i].name}-{k + 1:02d}"
            library.append((clip_id, spans[k]))
            by_source.setdefault(i, []).append((clip_id, spans[k]))

    def pick_edits() -> tuple[str, ...]:
        first = rng.choice(edits)
        chosen = [first]
        if rng.random() < two_edit_prob:
            others = [e for e in edits if e != first and not ({e, first} <= _TEMPORAL)]
            if others:
                chosen.append(rng.choice(others))
        # The insertion wraps the other edit: it comes last.
        return tuple(sorted(chosen, key=lambda e: (e == INSERTION, edits.index(e))))

    def sub_span(length: float) -> tuple[float, float]:
        dur = min(length, max(min(1.0, length), rng.uniform(0.5, 0.9) * length))
        return rng.uniform(0.0, length - dur), dur

    def pick_filler(source: int) -> _Filler:
        # Prefer a source entirely out of the library, then a held-out stretch of another
        # library source, then a synthetic pattern.
        for pool in (held_out, held_slots):
            candidates = [s for s in pool if s.source != source]
            if candidates:
                span = rng.choice(candidates)
                pre, post = rng.uniform(1.0, 2.0), rng.uniform(1.0, 2.0)
                scale = min(1.0, span.duration_s / (pre + post))
                return _Filler(sources[span.source].path, span.start_s, pre * scale, post * scale)
        return _Filler(None, 0.0, rng.uniform(1.0, 2.0), rng.uniform(1.0, 2.0))

    plans: list[_QueryPlan] = []
    for i, clips in by_source.items():
        picks = rng.sample(clips, len(clips))
        for n in range(queries_per_video):
            clip_id, span = picks[n % len(picks)]
            chosen = pick_edits()
            start, dur = sub_span(span.duration_s)
            filler = pick_filler(i) if INSERTION in chosen else None
            origin = out_dir / "library" / f"{clip_id}.mp4"
            plans.append(_QueryPlan("", chosen, clip_id, i, origin, start, dur, filler))

    # Negatives alternate between held-out sources (different scenes) and held-out
    # stretches of library sources (the same scenes at other times: hard negatives).
    pools = [rng.sample(p, len(p)) for p in (held_out, held_slots) if p]
    spans = [pool[k % len(pool)] for k in range(negatives) for pool in pools][:negatives]
    if negatives and not pools:
        logger.warning("no material held out of the library: no negative queries")
    for span in spans:
        chosen = pick_edits()
        start, dur = sub_span(span.duration_s)
        filler = pick_filler(span.source) if INSERTION in chosen else None
        plans.append(_QueryPlan("", chosen, None, span.source, None, span.start_s + start, dur, filler))

    # Shuffled, then numbered: neither a query's id nor its place gives its answer away.
    rng.shuffle(plans)
    plans = [dataclasses.replace(p, id=f"q{n:03d}") for n, p in enumerate(plans)]
    return _Plan(library, plans)


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


def _probe_sources(paths: list[Path]) -> list[_Source]:
    sources: list[_Source] = []
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
        name = base = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem.lower())
        n = 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.add(name)
        sources.append(_Source(name, path.resolve(), info.duration_s))
    return sources


def _source_fingerprint(src: _Source) -> dict[str, Any]:
    st = src.path.stat()
    return {"path": str(src.path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


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
    show_progress: bool = True,
    console: Console | None = None,
) -> Path:
    """Makes a benchmark from ``videos`` (files, or folders searched for videos) in
    ``out_dir``; returns the path of its ``ground_truth.json``.

    Each source is cut into segments of ``segment_s`` seconds. Sources with 3 or more
    segments keep ``holdout_fraction`` of them (at least one) out of the library, and at
    most ``max_segments_per_video`` go in. ``holdout_sources`` whole sources (default: a
    quarter of them when there are 4 or more; the ones with fewest segments) stay out of
    the library entirely. Each library source gets ``queries_per_video`` positive
    queries, and ``negatives`` negative queries are cut from the held-out material. Each
    query has one edit from ``edits``, or two with probability ``two_edit_prob``.

    Deterministic given the sources and ``seed``. A benchmark already in ``out_dir`` with
    the same sources and parameters is reused.
    """
    unknown = [e for e in edits if e != INSERTION and e not in EDITS and e not in EXTRA_EDITS]
    if unknown or not edits:
        raise ValueError(f"unknown edits {unknown}; choose from {list(DEFAULT_EDITS)}")
    out_dir = Path(out_dir).resolve()
    gt_path = out_dir / GROUND_TRUTH
    started = time.perf_counter()
    sources = _probe_sources(_find_videos(videos))
    if not sources:
        raise ValueError(f"no usable videos in {videos}")
    if holdout_sources is None:
        holdout_sources = len(sources) // 4 if len(sources) >= 4 else 0
    params = {
        "seed": seed, "segment_s": segment_s, "queries_per_video": queries_per_video,
        "negatives": negatives, "edits": list(edits),
        "max_segments_per_video": max_segments_per_video, "holdout_sources": holdout_sources,
        "holdout_fraction": holdout_fraction,
        "two_edit_prob": two_edit_prob,
    }  # fmt: skip
    spec = {
        "version": _FORMAT_VERSION,
        "params": params,
        "sources": [_source_fingerprint(s) for s in sources],
    }
    if gt_path.exists():
        try:
            old = GroundTruth.load(gt_path)
        except (OSError, KeyError, ValueError):
            old = None
        files = [c.path for c in old.library] + [q.path for q in old.queries] if old else []
        if old and old.spec == spec and all(f.exists() for f in files):
            logger.info("benchmark in %s is up to date", out_dir)
            return gt_path

    plan = _plan(
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
        task = progress.add_task("cutting library", total=len(plan.library) + len(plan.queries))
        for clip_id, span in plan.library:
            src = sources[span.source]
            dst = out_dir / "library" / f"{clip_id}.mp4"
            cut(src.path, dst, start_s=span.start_s, duration_s=span.duration_s)
            library.append(LibraryClip(clip_id, dst, src.name, round(span.start_s, 3), round(span.duration_s, 3)))
            progress.advance(task)
        progress.update(task, description="editing queries")
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            for q in plan.queries:
                dst = out_dir / "queries" / f"{q.id}.mp4"
                origin = q.origin or sources[q.source].path
                _make_query(q, origin, dst, Path(tmp), seed=seed)
                queries.append(
                    Query(q.id, dst, "+".join(q.edits), q.positive, sources[q.source].name,
                          round(q.start_s, 3), round(q.duration_s, 3))
                )  # fmt: skip
                progress.advance(task)
    GroundTruth(library, queries, spec).save(gt_path)
    n_neg = sum(q.positive is None for q in queries)
    logger.info(
        "benchmark: %d library clips from %d sources, %d queries (%d negatives) in %.1f s",
        len(library), len(sources), len(queries), n_neg, time.perf_counter() - started,
    )  # fmt: skip
    return gt_path


def _combined(names: Iterable[str]) -> Edit:
    parts = [EDITS.get(n) or EXTRA_EDITS[n] for n in names if n != INSERTION]
    vf = ",".join(e.vf for e in parts if e.vf) or None
    rates = [e.fps for e in parts if e.fps]
    return Edit(
        "+".join(e.name for e in parts),
        vf,
        max((e.crf for e in parts), default=23),
        min(rates, default=None),
    )


def _make_query(q: _QueryPlan, origin: Path, dst: Path, tmp: Path, *, seed: int) -> None:
    edit = _combined(q.edits)
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


def _insert(segment: Path, filler: _Filler, dst: Path, *, seed: int) -> None:
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


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def _ranks(scores: np.ndarray, positives: Sequence[int | None]) -> np.ndarray:
    """Rank (1 = best) of each positive query's copy. Ties count against the query: a
    constant score ranks the copy last, not first."""
    rows = [q for q, p in enumerate(positives) if p is not None]
    cols = [p for p in positives if p is not None]
    if not rows:
        return np.zeros(0, dtype=np.int64)
    target = scores[rows, cols][:, None]  # (P, 1)
    return (scores[rows] >= target).sum(axis=1).astype(np.int64)  # the copy itself counts once


def micro_average_precision(scores: np.ndarray, positives: Sequence[int | None]) -> float:
    """VSC22's µAP: every (query, library clip) pair, pooled and sorted by score; average
    precision of the true pairs. Negative queries' pairs can only lower it."""
    labels = np.zeros(scores.shape, dtype=bool)
    for q, p in enumerate(positives):
        if p is not None:
            labels[q, p] = True
    total = int(labels.sum())
    if total == 0:
        return float("nan")
    flat, truth = scores.ravel(), labels.ravel()
    # Sort by score, descending; among equal scores the false pairs first (pessimistic).
    order = np.lexsort((truth, -flat))
    hits = truth[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / total)


def evaluate(scores: np.ndarray, ground_truth: GroundTruth | Sequence[int | None]) -> dict[str, float]:
    """Retrieval metrics of a (queries x library) score matrix, higher = more similar.

    ``ground_truth`` is a :class:`GroundTruth` (rows and columns in its order) or, per
    query, the column of its copy (None for a negative). recall@k and mAP are over the
    queries that have a copy (with one copy, a query's average precision is 1 / rank);
    µAP pools all pairs, negatives' included.
    """
    positives = ground_truth.positives if isinstance(ground_truth, GroundTruth) else list(ground_truth)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[0] != len(positives):
        raise ValueError(f"scores have {scores.shape[0]} rows for {len(positives)} queries")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    ranks = _ranks(scores, positives)
    n_pos = len(ranks)

    def mean(values: np.ndarray) -> float:
        return float(np.mean(values)) if n_pos else float("nan")

    return {
        "recall@1": mean(ranks <= 1),
        "recall@5": mean(ranks <= 5),
        "mAP": mean(1.0 / np.maximum(ranks, 1)),
        "uAP": micro_average_precision(scores, positives),
        "queries": len(positives),
        "positives": n_pos,
        "negatives": len(positives) - n_pos,
    }


METRICS = ("recall@1", "recall@5", "mAP", "uAP")
_LABELS = {"recall@1": "recall@1", "recall@5": "recall@5", "mAP": "mAP", "uAP": "µAP"}


# --------------------------------------------------------------------------------------
# Systems
# --------------------------------------------------------------------------------------

Clip = np.ndarray  # (T, S, S, 3) uint8 RGB frames, sampled at a fixed rate
ScoreFn = Callable[[list[Clip], list[Clip]], np.ndarray]


@dataclass(frozen=True)
class System:
    """A system under test: ``score_matrix(queries, library) -> (Q, L)``, higher = more
    similar, on clips decoded at ``frame_size``. ``baseline`` systems are what a trained
    encoder has to beat."""

    name: str
    frame_size: int
    score_matrix: ScoreFn
    baseline: bool = True


def vector_system(
    name: str,
    frame_size: int,
    describe: Callable[[list[Clip]], np.ndarray],
    *,
    baseline: bool = True,
) -> System:
    """A system from a descriptor (clips -> (N, D) L2-normalised vectors): cosine scores."""

    def score(queries: list[Clip], library: list[Clip]) -> np.ndarray:
        return describe(queries) @ describe(library).T  # (Q, D) @ (D, L)

    return System(name, frame_size, score, baseline)


def encoder_system(name: str, model: Any, *, baseline: bool, batch_size: int = 8) -> System:
    """A :class:`app.learn.encoder.VideoEncoder`, embedding ``batch_size`` clips per forward."""

    def describe(clips: list[Clip]) -> np.ndarray:
        parts = [model.embed(clips[i : i + batch_size]) for i in range(0, len(clips), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, model.config.output_dim), np.float32)

    return vector_system(name, int(model.config.frame_size), describe, baseline=baseline)


def _gray(frames: np.ndarray) -> np.ndarray:
    """(T, S, S, 3) uint8 -> (T, S, S) float32 luma."""
    return frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def tiny_frames_descriptor(clips: list[Clip], *, size: int = 16) -> np.ndarray:
    """Each frame shrunk to size x size grayscale, mean-centred and L2-normalised, then
    averaged over time: (N, size*size), L2-normalised."""
    out = np.zeros((len(clips), size * size), dtype=np.float32)
    for i, clip in enumerate(clips):
        g = _gray(clip)  # (T, S, S)
        t, s = g.shape[:2]
        f = s // size
        g = g[:, : f * size, : f * size].reshape(t, size, f, size, f).mean(axis=(2, 4))
        x = g.reshape(t, -1)
        x = x - x.mean(axis=1, keepdims=True)
        x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-6)
        out[i] = x.mean(axis=0)
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-6)


def tiny_frames_system(frame_size: int = SMALL_FRAME) -> System:
    return vector_system("tiny frames", frame_size, tiny_frames_descriptor)


def _dct_matrix(n: int) -> np.ndarray:
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n))  # (n, n), unnormalised DCT-II


def phash_bits(clip: Clip) -> np.ndarray:
    """The 64-bit DCT perceptual hash of each frame: (T, 64) bool. Frames are 32x32
    grayscale; the hash is the top-left 8x8 DCT coefficients against their median."""
    g = _gray(clip)
    if g.shape[1:] != (32, 32):
        from PIL import Image

        g = np.stack([np.asarray(Image.fromarray(f).resize((32, 32), Image.Resampling.BILINEAR)) for f in g])
    c = _dct_matrix(32)[:8]  # (8, 32)
    low = np.einsum("ij,tjk,lk->til", c, g.astype(np.float64), c).reshape(len(g), 64)  # (T, 64)
    return low > np.median(low, axis=1, keepdims=True)


def phash_similarity(queries: list[Clip], library: list[Clip]) -> np.ndarray:
    """Clip similarity from frame hashes: each query frame's best match (1 - Hamming/64)
    among a library clip's frames, averaged over the query's frames. (Q, L) in [0, 1]."""
    qh = [phash_bits(c) for c in queries]
    lh = [phash_bits(c) for c in library]
    q_all = np.concatenate(qh).astype(np.float32) * 2 - 1  # (sum Tq, 64), +-1
    l_all = np.concatenate(lh).astype(np.float32) * 2 - 1  # (sum Tl, 64)
    frame_sim = (64 + q_all @ l_all.T) / 128  # 1 - hamming/64: (sum Tq, sum Tl)
    l_starts = np.cumsum([0, *map(len, lh)])[:-1]
    best = np.maximum.reduceat(frame_sim, l_starts, axis=1)  # (sum Tq, L)
    q_starts = np.cumsum([0, *map(len, qh)])[:-1]
    return np.add.reduceat(best, q_starts, axis=0) / np.array([len(h) for h in qh])[:, None]


def phash_system(frame_size: int = SMALL_FRAME) -> System:
    return System("pHash", frame_size, phash_similarity)


BASELINES = ("untrained", "tiny_frames", "phash")


def _systems(checkpoints: dict[str, Path], baselines: Sequence[str], batch_size: int) -> list[System]:
    from app.learn.encoder import EncoderConfig, initial_encoder, load_checkpoint

    systems: list[System] = []
    config = None
    for name, path in checkpoints.items():
        model, _ = load_checkpoint(Path(path))
        config = config or model.config
        systems.append(encoder_system(name, model, baseline=False, batch_size=batch_size))
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {BASELINES}")
    if "untrained" in baselines:
        # The same architecture as the (first) trained encoder, before any training.
        model = initial_encoder(config or EncoderConfig())
        systems.append(encoder_system("untrained", model, baseline=True, batch_size=batch_size))
    if "tiny_frames" in baselines:
        systems.append(tiny_frames_system())
    if "phash" in baselines:
        systems.append(phash_system())
    return systems


# --------------------------------------------------------------------------------------
# Fine-tuning on the library
# --------------------------------------------------------------------------------------


def finetune_on_library(
    ground_truth_path: Path,
    out_dir: Path,
    *,
    steps: int,
    preset: str = "cpu-small",
    init_checkpoint: Path | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
) -> Any:
    """The product's ``vidsim finetune``, inside the benchmark: self-supervised training on
    the benchmark's **library clips only** (the company's library; never a query, whose
    edits the encoder must not see), from ``init_checkpoint`` or, without one, from the
    preset's initial weights (those of the ``untrained`` baseline). Resumes a run already
    in ``out_dir``. Returns the :class:`app.learn.train.loop.TrainResult`; its ``checkpoint`` is the
    system to score."""
    from app.learn.train.config import TrainConfig
    from app.learn.train.loop import train

    gt = GroundTruth.load(Path(ground_truth_path))
    videos = [c.path for c in gt.library]
    queries = {q.path.resolve() for q in gt.queries}
    assert not queries & {v.resolve() for v in videos}, "a query file is in the library"
    config = TrainConfig.preset(preset, **{**(overrides or {}), "steps": steps, "epochs": None})
    return train(config, videos, out_dir=Path(out_dir), resume=True, init_checkpoint=init_checkpoint, progress=progress)


# --------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------


@dataclass
class Report:
    metrics: dict[str, dict[str, float]]  # system -> metric -> value
    per_edit: dict[str, dict[str, float]]  # system -> edit -> recall@1 of queries with it
    seconds: dict[str, float]  # system -> scoring time (embedding included); "decode@S"
    baselines: list[str]
    counts: dict[str, int]
    edit_counts: dict[str, int] = field(default_factory=dict)  # queries with a copy, per edit
    paths: dict[str, str] = field(default_factory=dict)

    def margins(self) -> dict[str, dict[str, float]]:
        """For each non-baseline system: metric minus the best baseline's."""
        out: dict[str, dict[str, float]] = {}
        for name, m in self.metrics.items():
            if name in self.baselines or not self.baselines:
                continue
            out[name] = {k: m[k] - max(self.metrics[b][k] for b in self.baselines) for k in METRICS}
        return out


def _decode_all(paths: list[Path], *, size: int, fps: float, max_frames: int, progress: Progress) -> list[Clip]:
    clips: list[Clip] = []
    task = progress.add_task(f"decoding at {size}x{size}", total=len(paths))
    for path in paths:
        try:
            clips.append(video_io.sample_frames(path, fps=fps, size=size, max_frames=max_frames).frames)
        except video_io.VideoError as exc:
            raise RuntimeError(f"benchmark clip {path} does not decode: {exc.reason}") from exc
        progress.advance(task)
    return clips


def run(
    ground_truth_path: Path,
    *,
    out_dir: Path,
    checkpoints: dict[str, Path] | None = None,
    baselines: Sequence[str] = BASELINES,
    fps: float = 1.0,
    max_frames: int = 64,
    batch_size: int = 8,
    console: Console | None = None,
    show_progress: bool = True,
) -> Report:
    """Runs every system (trained ``checkpoints`` by name, then ``baselines``) on one
    benchmark; prints a table and writes ``report.json``, ``report.md`` and ``report.png``
    into ``out_dir``. Clips are decoded once per frame size, ``fps`` frames a second."""
    console = console or Console()
    gt = GroundTruth.load(Path(ground_truth_path))
    systems = _systems(dict(checkpoints or {}), baselines, batch_size)
    q_paths = [q.path for q in gt.queries]
    l_paths = [c.path for c in gt.library]
    positives = gt.positives
    metrics: dict[str, dict[str, float]] = {}
    per_edit: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    decoded: dict[int, tuple[list[Clip], list[Clip]]] = {}
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=not show_progress,
    )  # fmt: skip
    with progress:
        for system in systems:
            size = system.frame_size
            if size not in decoded:
                t0 = time.perf_counter()
                decoded[size] = (
                    _decode_all(q_paths, size=size, fps=fps, max_frames=max_frames, progress=progress),
                    _decode_all(l_paths, size=size, fps=fps, max_frames=max_frames, progress=progress),
                )
                seconds[f"decode@{size}"] = time.perf_counter() - t0
            queries, library = decoded[size]
            t0 = time.perf_counter()
            scores = np.asarray(system.score_matrix(queries, library), dtype=np.float64)
            seconds[system.name] = time.perf_counter() - t0
            if scores.shape != (len(queries), len(library)):
                raise ValueError(f"{system.name}: scores {scores.shape}, expected {(len(queries), len(library))}")
            metrics[system.name] = evaluate(scores, positives)
            per_edit[system.name] = _recall_by_edit(scores, gt)
            logger.info("%s: %s in %.1f s", system.name, metrics[system.name], seconds[system.name])
    counts = {
        "library": len(gt.library),
        "sources": len({c.source for c in gt.library}),
        "queries": len(gt.queries),
        "negatives": sum(p is None for p in positives),
    }
    edit_counts: dict[str, int] = {}
    for q in gt.queries:
        for name in q.edits if q.positive is not None else ():
            edit_counts[name] = edit_counts.get(name, 0) + 1
    baseline_names = [s.name for s in systems if s.baseline]
    report = Report(metrics, per_edit, seconds, baseline_names, counts, dict(sorted(edit_counts.items())))
    _write_reports(report, Path(out_dir), gt_path=Path(ground_truth_path), fps=fps)
    console.print(_table(report))
    return report


def _recall_by_edit(scores: np.ndarray, gt: GroundTruth) -> dict[str, float]:
    ranks = _ranks(scores, gt.positives)
    with_copy = [q for q in gt.queries if q.positive is not None]
    hits: dict[str, list[bool]] = {}
    for q, rank in zip(with_copy, ranks, strict=True):
        for name in q.edits:
            hits.setdefault(name, []).append(bool(rank == 1))
    return {name: float(np.mean(h)) for name, h in sorted(hits.items())}


def _table(report: Report) -> Table:
    c = report.counts
    table = Table(
        title=f"Retrieval: {c['library']} library clips ({c['sources']} sources), "
        f"{c['queries']} queries ({c['negatives']} negatives)"
    )
    table.add_column("system")
    for k in METRICS:
        table.add_column(_LABELS[k], justify="right")
    table.add_column("seconds", justify="right")
    best = {k: max(m[k] for m in report.metrics.values()) for k in METRICS}
    for name, m in report.metrics.items():
        cells = [f"[bold]{m[k]:.3f}[/bold]" if m[k] == best[k] else f"{m[k]:.3f}" for k in METRICS]
        table.add_row(name, *cells, f"{report.seconds[name]:.1f}")
    return table


def _markdown(report: Report, *, gt_path: Path, fps: float) -> str:
    c = report.counts
    lines = [
        "# Retrieval benchmark",
        "",
        f"Ground truth `{gt_path}`: {c['library']} library clips from {c['sources']} sources; "
        f"{c['queries']} queries, {c['queries'] - c['negatives']} with a copy in the library and "
        f"{c['negatives']} negatives. Frames sampled at {fps:g} fps. recall@k and mAP over the "
        "queries with a copy; µAP over all (query, library clip) pairs, negatives included.",
        "",
        "| system | " + " | ".join(_LABELS[k] for k in METRICS) + " | seconds |",
        "|---|" + "---:|" * (len(METRICS) + 1),
    ]
    for name, m in report.metrics.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + f" | {report.seconds[name]:.1f} |")
    for name, margin in report.margins().items():
        lines += [
            "",
            f"## {name}: margin over the best baseline",
            "",
            f"| metric | {name} | best baseline | margin |",
            "|---|---:|---|---:|",
        ]
        for k in METRICS:
            best = max(report.baselines, key=lambda b: report.metrics[b][k])
            ours, theirs = report.metrics[name][k], report.metrics[best][k]
            lines.append(f"| {_LABELS[k]} | {ours:.3f} | {best} ({theirs:.3f}) | {margin[k]:+.3f} |")
    edits = sorted({e for per in report.per_edit.values() for e in per})
    names = list(report.per_edit)
    lines += [
        "",
        "## recall@1 by edit (a query with two edits counts under both)",
        "",
        "| edit | queries | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for e in edits:
        lines.append(
            f"| {e} | {report.edit_counts.get(e, 0)} | "
            + " | ".join(f"{report.per_edit[n].get(e, float('nan')):.2f}" for n in names)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _plot(report: Report, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report.metrics)
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(names))
    x = np.arange(len(METRICS))
    for i, name in enumerate(names):
        values = [report.metrics[name][k] for k in METRICS]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, [_LABELS[k] for k in METRICS])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    c = report.counts
    ax.set_title(f"{c['library']} library clips, {c['queries']} queries ({c['negatives']} negatives)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def _write_reports(report: Report, out_dir: Path, *, gt_path: Path, fps: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    report.paths = {k: str(out_dir / f"report.{k}") for k in ("json", "md", "png")}
    data = {
        "ground_truth": str(gt_path),
        "ground_truth_sha256": hashlib.sha256(gt_path.read_bytes()).hexdigest(),
        "fps": fps,
        "counts": report.counts,
        "metrics": report.metrics,
        "margins_over_best_baseline": report.margins(),
        "recall@1_by_edit": report.per_edit,
        "queries_by_edit": report.edit_counts,
        "seconds": report.seconds,
        "baselines": report.baselines,
    }
    write_atomic(out_dir / "report.json", json.dumps(_finite(data), indent=1).encode())
    write_atomic(out_dir / "report.md", _markdown(report, gt_path=gt_path, fps=fps).encode())
    _plot(report, out_dir / "report.png")


def _finite(value: Any) -> Any:
    """NaN (a metric with no query to average) as JSON null, not the invalid ``NaN``."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
