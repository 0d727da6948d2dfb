"""Preprocessing: cut advertising heads and tails before training.

Two mechanisms, the larger cut winning at each end:

- **fixed trims**, per source (``options.trim_head_s``/``trim_tail_s``) or global
  (``crawl_trim_head_s``/``crawl_trim_tail_s``);
- **recurring segments**: intros, outros and sponsor cards that a channel puts on many of
  its videos. The first and last ``crawl_trim_scan_s`` seconds of every video are sampled
  at ``crawl_trim_fps`` as tiny grey fingerprints (8x8); video *v*'s intro is the longest
  prefix of samples that matches (mean absolute difference <= ``crawl_trim_max_diff``)
  the same samples of at least ``crawl_trim_min_support`` other videos of its source. The
  boundary is then refined at 10 samples/s against the best-matching video, so the cut is
  within about 0.1 s of the true end of the intro, on the later side. Outros likewise,
  aligned on the videos' ends.

Fingerprints are stored on the items, so a later video is compared with earlier ones
without decoding them again. Decoding runs in app.media.video's sandboxed child; cutting
re-encodes with ffmpeg (frame-exact) into ``crawl_dir/clean``, through a temporary name.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.crawl.crawler import Progress, Sessions, _no_progress, reject
from app.crawl.models import FETCHED, HOLDS_CONTENT, PREPROCESSED, CrawledItem, CrawlSource
from app.files import atomic_path
from app.media import video as video_io
from app.media.ffmpeg import run_ffmpeg
from app.media.video import decode_limits
from app.models import utcnow

logger = logging.getLogger(__name__)

FP_SIDE = 8  # fingerprint: 8x8 grey levels, 64 bytes per sample
_DECODE_SIZE = 16  # frames decoded at 16x16, averaged down to 8x8
REFINE_FPS = 10.0
_MAX_REFERENCES = 4  # videos sampled again to refine a boundary

# Refinement windows already decoded: (item id, "head"|"tail", samples) -> fingerprints.
WindowCache = dict[tuple[int, str, int], "np.ndarray | None"]


# --------------------------------------------------------------------------- fingerprints


def fingerprint_frames(frames: np.ndarray) -> np.ndarray:
    """(T, S, S, 3) uint8 RGB -> (T, 64) uint8 grey 8x8 block means."""
    grey = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (T, S, S)
    t, s, _ = grey.shape
    block = s // FP_SIDE
    grey = grey[:, : block * FP_SIDE, : block * FP_SIDE].reshape(t, FP_SIDE, block, FP_SIDE, block).mean(axis=(2, 4))
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8).reshape(t, FP_SIDE * FP_SIDE)


def sample_fingerprints(
    path: str | Path, *, start_s: float, span_s: float, fps: float, limits: video_io.DecodeLimits
) -> np.ndarray:
    """(T, 64) fingerprints of ``[start_s, start_s + span_s)`` at ``fps`` samples/s."""
    n = max(1, math.ceil(span_s * fps - 1e-6))
    sample = video_io.sample_frames(
        path, fps=fps, size=_DECODE_SIZE, max_frames=n, start_s=start_s, duration_s=span_s, limits=limits
    )
    return fingerprint_frames(sample.frames)


def scan_span(duration_s: float, settings: Settings) -> float:
    """Seconds scanned at each end: a whole number of sample periods, so that tail samples
    of videos of different lengths fall at the same times before their ends."""
    fps = settings.crawl_trim_fps
    return math.floor(min(settings.crawl_trim_scan_s, duration_s) * fps) / fps


def head_tail_fingerprints(path: str | Path, duration_s: float, *, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Fingerprints of the first and last :func:`scan_span` seconds; the tail's are
    reversed (index 0 = the last sample before the end)."""
    fps, span = settings.crawl_trim_fps, scan_span(duration_s, settings)
    limits = decode_limits(settings)
    if span <= 0:
        empty = np.zeros((0, FP_SIDE * FP_SIDE), dtype=np.uint8)
        return empty, empty
    head = sample_fingerprints(path, start_s=0.0, span_s=span, fps=fps, limits=limits)
    tail = sample_fingerprints(path, start_s=max(0.0, duration_s - span), span_s=span, fps=fps, limits=limits)
    return head, tail[::-1].copy()


def _pack(fp: np.ndarray) -> bytes:
    return np.ascontiguousarray(fp, dtype=np.uint8).tobytes()


def _unpack(data: bytes | None) -> np.ndarray:
    if not data:
        return np.zeros((0, FP_SIDE * FP_SIDE), dtype=np.uint8)
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, FP_SIDE * FP_SIDE)


# --------------------------------------------------------------------------- detection


def frame_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute grey difference per sample pair: (T, 64) x (T, 64) -> (T,)."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=1)


def common_run(a: np.ndarray, b: np.ndarray, *, max_diff: float) -> int:
    """How many leading samples of ``a`` and ``b`` match."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differs = frame_diff(a[:n], b[:n]) > max_diff
    return int(np.argmax(differs)) if differs.any() else n


@dataclass(frozen=True)
class Recurring:
    """The recurring segment found at one end of one video."""

    samples: int  # leading samples shared with enough other videos (0: none)
    supporters: tuple[int, ...]  # indices (in the others) of the videos sharing that many


def recurring_run(mine: np.ndarray, others: list[np.ndarray], *, max_diff: float, min_support: int) -> Recurring:
    """The longest prefix of ``mine`` found in at least ``min_support`` of ``others``."""
    runs = [common_run(mine, other, max_diff=max_diff) for other in others]
    if len(runs) < min_support or min_support < 1:
        return Recurring(0, ())
    samples = sorted(runs, reverse=True)[min_support - 1]
    if samples == 0:
        return Recurring(0, ())
    supporters = sorted((i for i, r in enumerate(runs) if r >= samples), key=lambda i: -runs[i])
    return Recurring(samples, tuple(supporters))


@dataclass
class TrimPlan:
    head_s: float = 0.0
    tail_s: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        return {"head_s": round(self.head_s, 3), "tail_s": round(self.tail_s, 3), **self.notes}


# --------------------------------------------------------------------------- the stage


@dataclass
class PreprocessCounts:
    preprocessed: int = 0
    trimmed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    seconds_cut: float = 0.0
    stopped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "preprocessed": self.preprocessed,
            "trimmed": self.trimmed,
            "rejected": dict(self.rejected),
            "seconds_cut": round(self.seconds_cut, 2),
            "stopped": self.stopped,
        }


def preprocess(
    *,
    sessions: Sessions,
    settings: Settings,
    source_ids: list[int] | None = None,
    progress: Progress = _no_progress,
    max_seconds: float | None = None,
) -> PreprocessCounts:
    """Fingerprints, trims and cuts every fetched item (of ``source_ids``, or all). Stops
    between items after ``max_seconds`` (default ``crawl_preprocess_max_s``); the rest waits for
    the next run."""
    counts = PreprocessCounts()
    deadline = time.monotonic() + (max_seconds or settings.crawl_preprocess_max_s)
    with sessions() as session:
        stmt = select(CrawledItem.source_id).where(CrawledItem.state == FETCHED).distinct()
        if source_ids:
            stmt = stmt.where(CrawledItem.source_id.in_(source_ids))
        sources = sorted(session.scalars(stmt))
    for source_id in sources:
        if time.monotonic() > deadline:
            counts.stopped = "run time budget exhausted"
            break
        _preprocess_source(
            source_id, sessions=sessions, settings=settings, counts=counts, progress=progress, deadline=deadline
        )
    logger.info("preprocess: %s", counts.as_dict())
    return counts


def _preprocess_source(
    source_id: int,
    *,
    sessions: Sessions,
    settings: Settings,
    counts: PreprocessCounts,
    progress: Progress,
    deadline: float,
) -> None:
    # 1. Fingerprint the ends of every stored video of the source that has none yet.
    with sessions() as session:
        missing = list(
            session.scalars(
                select(CrawledItem.id)
                .where(
                    CrawledItem.source_id == source_id,
                    CrawledItem.state.in_(HOLDS_CONTENT),
                    CrawledItem.head_fp.is_(None),
                )
                .order_by(CrawledItem.id)
            )
        )
    for n, item_id in enumerate(missing):
        if time.monotonic() > deadline:
            counts.stopped = "run time budget exhausted"
            return
        progress("fingerprint", n, len(missing), f"source {source_id}")
        with sessions() as session:
            item = session.get_one(CrawledItem, item_id)
            path, duration = item.local_path, item.duration_s or 0.0
        try:
            head, tail = head_tail_fingerprints(path or "", duration, settings=settings)
        except video_io.VideoError as exc:
            with sessions() as session:
                reject(session.get_one(CrawledItem, item_id), "decode", f"fingerprinting failed: {exc.reason}")
            counts.rejected["decode"] = counts.rejected.get("decode", 0) + 1
            continue
        with sessions() as session:
            item = session.get_one(CrawledItem, item_id)
            item.head_fp, item.tail_fp = _pack(head), _pack(tail)

    # 2. Plan and cut each fetched video against all the source's fingerprinted videos.
    with sessions() as session:
        source = session.get_one(CrawlSource, source_id)
        options = dict(source.options or {})
        rows = session.execute(
            select(CrawledItem.id, CrawledItem.state, CrawledItem.head_fp, CrawledItem.tail_fp)
            .where(
                CrawledItem.source_id == source_id,
                CrawledItem.state.in_(HOLDS_CONTENT),
                CrawledItem.head_fp.is_not(None),
            )
            .order_by(CrawledItem.id)
        ).all()
    prints = {r.id: (_unpack(r.head_fp), _unpack(r.tail_fp)) for r in rows}
    todo = [r.id for r in rows if r.state == FETCHED]
    cache: WindowCache = {}
    for n, item_id in enumerate(todo):
        if time.monotonic() > deadline:
            counts.stopped = "run time budget exhausted"
            return
        progress("trim", n, len(todo), f"source {source_id}")
        with sessions() as session:
            plan = plan_trim(session, item_id, prints, options=options, settings=settings, cache=cache)
        _cut_item(item_id, plan, sessions=sessions, settings=settings, counts=counts)
    progress("trim", len(todo), len(todo), f"source {source_id} done")


def plan_trim(
    session: Session,
    item_id: int,
    prints: dict[int, tuple[np.ndarray, np.ndarray]],
    *,
    options: dict[str, Any],
    settings: Settings,
    cache: WindowCache | None = None,
) -> TrimPlan:
    """What to cut from one item: fixed trims, and recurring segments found against the
    other fingerprinted videos of its source (``prints``: id -> (head, reversed tail))."""
    fixed_head = float(options.get("trim_head_s", settings.crawl_trim_head_s) or 0.0)
    fixed_tail = float(options.get("trim_tail_s", settings.crawl_trim_tail_s) or 0.0)
    plan = TrimPlan(
        fixed_head, fixed_tail, {"head": "fixed" if fixed_head else None, "tail": "fixed" if fixed_tail else None}
    )
    if not settings.crawl_trim_detect or item_id not in prints:
        return plan
    other_ids = [i for i in prints if i != item_id]
    if len(other_ids) < settings.crawl_trim_min_support:
        plan.notes["detection"] = f"not enough videos in the source to compare ({len(other_ids) + 1})"
        return plan
    fps = settings.crawl_trim_fps
    for end, index in (("head", 0), ("tail", 1)):
        found = recurring_run(
            prints[item_id][index],
            [prints[i][index] for i in other_ids],
            max_diff=settings.crawl_trim_max_diff,
            min_support=settings.crawl_trim_min_support,
        )
        if found.samples == 0:
            continue
        if found.samples >= len(prints[item_id][index]):
            # The whole scanned window recurs: the same video uploaded again, not an intro.
            plan.notes[f"{end}_same_video"] = f"matches {len(found.supporters)} other videos throughout the scan"
            continue
        supporters = [other_ids[i] for i in found.supporters[:_MAX_REFERENCES]]
        seconds = _refine(session, item_id, supporters, found.samples, end=end, settings=settings, cache=cache)
        if seconds > (plan.head_s if end == "head" else plan.tail_s):
            setattr(plan, f"{end}_s", seconds)
            plan.notes[end] = f"recurring: shared with {len(found.supporters)} other videos"
            plan.notes[f"{end}_coarse_s"] = round(
                found.samples / fps if end == "head" else (found.samples + 1) / fps, 3
            )
    return plan


def _refine(
    session: Session,
    item_id: int,
    supporters: list[int],
    samples: int,
    *,
    end: str,
    settings: Settings,
    cache: WindowCache | None,
) -> float:
    """The segment's length in seconds: between ``lo`` (surely inside it) and ``coarse``
    (surely past it) from the coarse samples, refined by sampling the video and the
    videos sharing the segment at REFINE_FPS in that window: the segment goes on while
    the video still matches ``crawl_trim_min_support`` of them. Rounded up (a little
    content lost beats an advert kept).

    Head: samples at k/fps; ``samples`` matched means the intro ends in
    ((samples-1)/fps, samples/fps]. Tail: reversed sample i is at end - (i+1)/fps; the
    outro's length is in [samples/fps, (samples+1)/fps).
    """
    fps = settings.crawl_trim_fps
    lo, coarse = ((samples - 1) / fps, samples / fps) if end == "head" else (samples / fps, (samples + 1) / fps)
    cache = {} if cache is None else cache
    limits = decode_limits(settings)

    def window(row_id: int) -> np.ndarray | None:
        key = (row_id, end, samples)
        if key not in cache:
            row = session.get_one(CrawledItem, row_id)
            start = lo if end == "head" else max(0.0, (row.duration_s or 0.0) - coarse)
            try:
                fp = sample_fingerprints(
                    row.local_path or "", start_s=start, span_s=coarse - lo, fps=REFINE_FPS, limits=limits
                )
                cache[key] = fp if end == "head" else fp[::-1]  # tail: index r at end - lo - (r+1)/REFINE_FPS
            except video_io.VideoError as exc:
                logger.info("refining the %s of item %d failed: %s", end, row_id, exc.reason)
                cache[key] = None
        return cache[key]

    mine = window(item_id)
    theirs = [w for w in (window(i) for i in supporters) if w is not None]
    if mine is None or not theirs:
        return coarse
    n = min(len(mine), *(len(w) for w in theirs))
    # How many of the other videos each refinement sample still matches: (n,)
    matches = np.sum([frame_diff(mine[:n], w[:n]) <= settings.crawl_trim_max_diff for w in theirs], axis=0)
    ends = matches < min(settings.crawl_trim_min_support, len(theirs))
    if not ends.any():
        return coarse
    first = int(np.argmax(ends))
    if end == "head":
        # Sample j is at lo + j/REFINE_FPS; j = 0 matched coarsely (a mismatch there is noise).
        return lo + first / REFINE_FPS if first > 0 else coarse
    return min(coarse, lo + (first + 1) / REFINE_FPS)


def _cut_item(
    item_id: int, plan: TrimPlan, *, sessions: Sessions, settings: Settings, counts: PreprocessCounts
) -> None:
    with sessions() as session:
        item = session.get_one(CrawledItem, item_id)
        src, duration, content_hash = Path(item.local_path or ""), item.duration_s or 0.0, item.content_hash
    keep = duration - plan.head_s - plan.tail_s
    if keep < settings.crawl_min_clean_seconds:
        with sessions() as session:
            item = session.get_one(CrawledItem, item_id)
            item.trimmed = plan.as_record()
            reject(item, "too_short", f"{keep:.1f} s left after trimming {plan.head_s:.1f} s + {plan.tail_s:.1f} s")
        counts.rejected["too_short"] = counts.rejected.get("too_short", 0) + 1
        return
    if plan.head_s <= 0 and plan.tail_s <= 0:
        clean = src  # nothing to cut: the raw file is clean
    else:
        clean = settings.crawl_dir / "clean" / f"{content_hash}-h{plan.head_s:.2f}-t{plan.tail_s:.2f}.mp4"
        try:
            with atomic_path(clean) as tmp:
                run_ffmpeg(
                    ["-ss", f"{plan.head_s:.3f}", "-i", str(src), "-t", f"{keep:.3f}", "-map", "0:v:0", "-an", "-sn",
                     "-dn", "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
                     "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2", "-movflags", "+faststart", str(tmp)],
                    timeout_s=min(120 + 2 * keep, 800),
                )  # fmt: skip
        except (RuntimeError, OSError) as exc:
            with sessions() as session:
                reject(session.get_one(CrawledItem, item_id), "cut", f"cutting failed: {exc}"[:500])
            counts.rejected["cut"] = counts.rejected.get("cut", 0) + 1
            return
        counts.trimmed += 1
        counts.seconds_cut += plan.head_s + plan.tail_s
    with sessions() as session:
        item = session.get_one(CrawledItem, item_id)
        item.state, item.clean_path, item.clean_duration_s = PREPROCESSED, str(clean), keep
        item.trimmed, item.preprocessed_at = plan.as_record(), utcnow()
    counts.preprocessed += 1
    logger.info(
        "item %d preprocessed: cut %.2f s head, %.2f s tail (%s)", item_id, plan.head_s, plan.tail_s, plan.notes
    )


def training_files(session: Session) -> list[Path]:
    """Clean files ready for the training data loader, oldest first."""
    paths = session.scalars(
        select(CrawledItem.clean_path)
        .where(CrawledItem.state == PREPROCESSED, CrawledItem.clean_path.is_not(None))
        .order_by(CrawledItem.id)
    )
    return [Path(p) for p in paths if p and Path(p).is_file()]
