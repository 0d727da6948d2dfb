"""The benchmark's plan: which sources belong to the development part and which to the
test part, which stretches of them become library clips, which become queries (positive
or negative), under which edits. A pure function of the sources and the seed;
:mod:`app.evaluate.generate` executes it with ffmpeg.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.evaluate.edits import INSERTION
from app.evaluate.ground_truth import DEV, PARTS, TEST

logger = logging.getLogger(__name__)

# Two of these in one query would only compound the speed change.
_TEMPORAL = frozenset({"speed_up", "slow_down"})


@dataclass(frozen=True)
class Source:
    """A video the benchmark is cut from, probed; ``name`` is unique among the sources."""

    name: str
    path: Path
    duration_s: float


@dataclass(frozen=True)
class Span:
    """A stretch of one source."""

    source: int  # index into the sources
    start_s: float
    duration_s: float


@dataclass(frozen=True)
class Filler:
    """The video a copy is inserted into: [start, start+pre) before it, then
    [start+pre, start+pre+post) after it. ``path`` None means a synthetic pattern."""

    path: Path | None
    start_s: float
    pre_s: float
    post_s: float


@dataclass(frozen=True)
class QueryPlan:
    """One query to make: what it copies, from where, under which edits."""

    id: str
    edits: tuple[str, ...]
    positive: str | None
    source: int
    origin: Path | None  # the library clip a positive is cut from; None: the source itself
    start_s: float
    duration_s: float
    filler: Filler | None
    part: str = DEV  # its source's


@dataclass(frozen=True)
class Plan:
    """Every library clip and query of a benchmark, before any video is cut."""

    library: list[tuple[str, Span]]  # (id, span in its source)
    queries: list[QueryPlan]
    parts: list[str]  # the part of each source (app.evaluate.ground_truth.PARTS)


def split_sources(sources: list[Source], *, segment_s: float, seed: int) -> list[str]:
    """The part of each source (:data:`PARTS`), from the sources and ``seed`` alone (not
    from any other parameter, so changing how many queries are cut never moves a source
    between parts). Sources are paired by length (segments of ``segment_s``, then name)
    and each pair split at random between the parts, so both get about as much footage;
    an odd one out goes to a random part. A single source is all dev (no test part)."""
    if len(sources) < 2:
        if sources:
            logger.warning("one source: no test part (the benchmark can be tuned on, not claimed)")
        return [DEV] * len(sources)
    rng = random.Random(f"split-{seed}")
    order = sorted(range(len(sources)), key=lambda i: (_segments(sources[i], segment_s), sources[i].name))
    parts = [DEV] * len(sources)
    for k in range(0, len(order), 2):
        pair = order[k : k + 2]
        drawn = rng.sample(PARTS, 2)
        for i, part in zip(pair, drawn, strict=False):
            parts[i] = part
    return parts


def _segments(src: Source, segment_s: float) -> int:
    return max(1, int(src.duration_s // segment_s))


def plan_benchmark(
    sources: list[Source],
    *,
    out_dir: Path,
    seed: int,
    segment_s: float,
    queries_per_video: int,
    negatives: int,
    edits: Sequence[str],
    max_segments_per_video: int,
    holdout_sources: int | None,
    holdout_fraction: float,
    two_edit_prob: float,
) -> Plan:
    """The library clips and queries of a benchmark (see :func:`app.evaluate.generate.generate`
    for what the parameters mean): the sources split into parts (:func:`split_sources`),
    then each part planned on its own, so none of its queries, negatives or insertion
    fillers holds footage of the other part. ``negatives`` are shared between the parts
    by their number of library sources. Deterministic given ``sources`` and ``seed``;
    positives' ``origin`` is their library clip's file under ``out_dir``."""
    rng = random.Random(seed)
    parts = split_sources(sources, segment_s=segment_s, seed=seed)
    members = {p: [i for i in range(len(sources)) if parts[i] == p] for p in PARTS}
    # Library sources per part: all but the held-out ones.
    held = {p: _holdout_count(len(members[p]), holdout_sources) for p in PARTS}
    in_library = {p: max(0, len(members[p]) - held[p]) for p in PARTS}
    total = sum(in_library.values())
    share_dev = round(negatives * in_library[DEV] / total) if total else 0
    shares = {DEV: share_dev, TEST: negatives - share_dev}
    library: list[tuple[str, Span]] = []
    plans: list[QueryPlan] = []
    for p in PARTS:
        if members[p]:
            part_library, part_queries = _plan_part(
                sources, members[p], p, rng=rng, out_dir=out_dir, segment_s=segment_s,
                queries_per_video=queries_per_video, negatives=shares[p], edits=edits,
                max_segments_per_video=max_segments_per_video, holdout_sources=held[p],
                holdout_fraction=holdout_fraction, two_edit_prob=two_edit_prob,
            )  # fmt: skip
            library += part_library
            plans += part_queries
    # Shuffled, then numbered: neither a query's id nor its place gives its answer away.
    rng.shuffle(plans)
    plans = [dataclasses.replace(p, id=f"q{n:03d}") for n, p in enumerate(plans)]
    return Plan(library, plans, parts)


def _holdout_count(n_sources: int, holdout_sources: int | None) -> int:
    """Whole sources of a part held out of its library: a quarter of them by default
    (with 4 or more), never all."""
    if holdout_sources is None:
        return n_sources // 4 if n_sources >= 4 else 0
    return max(0, min(holdout_sources, n_sources - 1))


def _plan_part(
    sources: list[Source],
    members: list[int],
    part: str,
    *,
    rng: random.Random,
    out_dir: Path,
    segment_s: float,
    queries_per_video: int,
    negatives: int,
    edits: Sequence[str],
    max_segments_per_video: int,
    holdout_sources: int,
    holdout_fraction: float,
    two_edit_prob: float,
) -> tuple[list[tuple[str, Span]], list[QueryPlan]]:
    """One part's library clips and (unnumbered) queries, from its ``members`` only."""
    slots: dict[int, list[Span]] = {}
    for i in members:
        src = sources[i]
        length = min(segment_s, src.duration_s)
        slots[i] = [Span(i, k * length, length) for k in range(_segments(src, segment_s))]

    # Whole sources held out: those with the fewest segments (they add least to the
    # library), ties broken by the seed.
    order = sorted(members, key=lambda i: (len(slots[i]), rng.random()))
    held_sources = set(order[:holdout_sources])
    library: list[tuple[str, Span]] = []
    by_source: dict[int, list[tuple[str, Span]]] = {}
    held_out: list[Span] = []  # of held-out sources
    held_slots: list[Span] = []  # of library sources, not cut into the library
    for i, spans in slots.items():
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

    def pick_filler(source: int) -> Filler:
        # Prefer a source entirely out of the library, then a held-out stretch of another
        # library source, then a synthetic pattern.
        for pool in (held_out, held_slots):
            candidates = [s for s in pool if s.source != source]
            if candidates:
                span = rng.choice(candidates)
                pre, post = rng.uniform(1.0, 2.0), rng.uniform(1.0, 2.0)
                scale = min(1.0, span.duration_s / (pre + post))
                return Filler(sources[span.source].path, span.start_s, pre * scale, post * scale)
        return Filler(None, 0.0, rng.uniform(1.0, 2.0), rng.uniform(1.0, 2.0))

    plans: list[QueryPlan] = []
    for i, clips in by_source.items():
        picks = rng.sample(clips, len(clips))
        for n in range(queries_per_video):
            clip_id, span = picks[n % len(picks)]
            chosen = pick_edits()
            start, dur = sub_span(span.duration_s)
            filler = pick_filler(i) if INSERTION in chosen else None
            origin = out_dir / "library" / f"{clip_id}.mp4"
            plans.append(QueryPlan("", chosen, clip_id, i, origin, start, dur, filler, part))

    # Negatives alternate between held-out sources (different scenes) and held-out
    # stretches of library sources (the same scenes at other times: hard negatives).
    pools = [rng.sample(p, len(p)) for p in (held_out, held_slots) if p]
    spans = [pool[k % len(pool)] for k in range(negatives) for pool in pools][:negatives]
    if negatives and not pools:
        logger.warning("%s part: no material held out of the library, no negative queries", part)
    for span in spans:
        chosen = pick_edits()
        start, dur = sub_span(span.duration_s)
        filler = pick_filler(span.source) if INSERTION in chosen else None
        plans.append(QueryPlan("", chosen, None, span.source, None, span.start_s + start, dur, filler, part))

    return library, plans
