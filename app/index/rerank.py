"""Re-ranking the first stage's candidates by frame alignment (:mod:`app.index.align`),
for serving (:func:`app.index.search.search_library`) and for the benchmark
(:mod:`app.evaluate.served`) alike: the same functions score both.

A candidate's final score fuses both stages' evidence: its frame-alignment score plus
FIRST_STAGE_WEIGHT x its first-stage calibrated score where that is positive (the whole
videos look alike beyond the query's neighbourhood). A copy inserted into other footage
has a low video-level score for the rest of that footage: it is not held against it.
Chosen on the benchmark's dev part with the untrained encoder (README, "Retrieval
benchmark"): alignment alone ranks well within a query (recall@1 0.644, insertion 1.00)
but compares badly across queries (micro-AP 0.536, below the first stage's 0.613); the
fusion keeps the ranking (recall@1 0.644, mAP 0.761) and lifts micro-AP to 0.624, where
an unclipped sum reaches 0.70 but loses every insertion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.index.align import BETA, Alignment, FramePairs, unit_rows
from app.index.frames import Background, Frames

FIRST_STAGE_WEIGHT = 0.25


def fused(match: float, first_calibrated: float) -> float:
    """The final score of a re-ranked candidate (see the module docstring)."""
    return match + FIRST_STAGE_WEIGHT * max(first_calibrated, 0.0)


@dataclass(frozen=True)
class Reranked:
    """A candidate after the second stage: its alignment (``alignment.score`` is the
    frame-alignment score) and the ``fused`` score it is ranked by."""

    alignment: Alignment
    fused: float


def rerank(
    query: Frames,
    candidates: dict[int, Frames],
    background: Background | None,
    *,
    first: dict[int, float] | None = None,
    locate: int | None = None,
    beta: float = BETA,
) -> dict[int, Reranked]:
    """Each candidate (key -> frames) aligned with ``query``: frames centred on the
    background's mean frame, similarities normalised by the query frames' background
    levels (none without a background), then fused with the candidate's ``first``-stage
    calibrated score (0 when not given). Spans are found for the ``locate`` best by fused
    score (default: all)."""
    if not candidates:
        return {}
    prepare = background.prepare if background is not None else unit_rows
    q = prepare(query.vectors)
    references = background.levels(q) if background is not None else np.zeros(len(q), dtype=np.float32)
    keys = list(candidates)
    lengths = [len(candidates[key]) for key in keys]
    # The candidates' frames padded to the longest and stacked, so that their similarities
    # to the query are one product, laid out as FramePairs wants them: (C, Tmax, Tq).
    t_max = max(lengths)
    padded = np.zeros((len(keys), t_max, q.shape[1]), dtype=np.float32)
    for i, key in enumerate(keys):
        padded[i, : lengths[i]] = candidates[key].vectors
    stacked = padded.reshape(-1, q.shape[1])
    sims = background.similarity(stacked, q) if background is not None else unit_rows(stacked) @ q.T
    pairs = FramePairs(sims.reshape(len(keys), t_max, len(q)), lengths, query.times,
                       [candidates[key].times for key in keys], references, beta=beta)  # fmt: skip
    first = first or {}
    final = [fused(float(m), first.get(key, 0.0)) for key, m in zip(keys, pairs.scores, strict=True)]
    order = sorted(range(len(keys)), key=lambda i: -final[i])
    located = set(order if locate is None else order[:locate])
    return {
        key: Reranked(pairs.alignment(i) if i in located else Alignment(float(pairs.scores[i])), final[i])
        for i, key in enumerate(keys)
    }
