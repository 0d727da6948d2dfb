"""Retrieval metrics of a (queries x library) score matrix: recall@1, recall@5 and mAP over
the queries that have a copy in the library, and VSC22's micro-average precision (µAP) over
every (query, library clip) pair, negatives included, which rewards scores that are
comparable across queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.evaluate.ground_truth import GroundTruth

# The metrics a report compares systems on, in its column order.
METRICS = ("recall@1", "recall@5", "mAP", "uAP")


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


def recall_at_1_by_edit(scores: np.ndarray, gt: GroundTruth) -> dict[str, float]:
    """recall@1 of the queries with a copy, per edit; a query with two edits counts under both."""
    ranks = _ranks(scores, gt.positives)
    with_copy = [q for q in gt.queries if q.positive is not None]
    hits: dict[str, list[bool]] = {}
    for q, rank in zip(with_copy, ranks, strict=True):
        for name in q.edits:
            hits.setdefault(name, []).append(bool(rank == 1))
    return {name: float(np.mean(h)) for name, h in sorted(hits.items())}
