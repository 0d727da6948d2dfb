"""Re-ranking the first stage's candidates by frame alignment (:mod:`app.index.align`),
for serving (:func:`app.index.search.search_library`) and for the benchmark
(:mod:`app.evaluate.served`) alike: the same functions score both.

A candidate's final score fuses both stages' evidence: its frame-alignment score plus
FIRST_STAGE_WEIGHT x its first-stage calibrated score (app.index.calibrate). Chosen on
the benchmark's dev part (README, "Retrieval benchmark"): alignment alone ranks best
within a query, but the video vector's calibration makes scores comparable across
queries (micro-AP 0.54 -> 0.70 for the untrained network at the same recall@5)."""

from __future__ import annotations

import numpy as np

from app.index.align import BETA, Alignment, align, frame_references, unit_rows
from app.index.frames import Background, Frames

FIRST_STAGE_WEIGHT = 0.5


def fused(match: float, first_calibrated: float) -> float:
    """The final score of a re-ranked candidate (see the module docstring)."""
    return match + FIRST_STAGE_WEIGHT * first_calibrated


def rerank(
    query: Frames, candidates: dict[int, Frames], background: Background | None, *, beta: float = BETA
) -> dict[int, Alignment]:
    """The :class:`Alignment` of each candidate (key -> frames) with ``query``: frames
    centred on the background's mean frame, similarities normalised by the query frames'
    background levels (none without a background)."""
    if not candidates:
        return {}
    prepare = background.prepare if background is not None else unit_rows
    q = prepare(query.vectors)
    references = (
        frame_references(q, background.frames, background.valid)
        if background is not None
        else np.zeros(len(q), dtype=np.float32)
    )
    keys = list(candidates)
    stacked = prepare(np.concatenate([candidates[key].vectors for key in keys]))
    sims = q @ stacked.T  # (Tq, sum Tc): one product for all
    bounds = np.cumsum([0, *(len(candidates[key]) for key in keys)])
    return {
        key: align(
            sims[:, bounds[i] : bounds[i + 1]], query.times, candidates[key].times, references=references, beta=beta
        )
        for i, key in enumerate(keys)
    }
