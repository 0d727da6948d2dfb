"""Retrieval metrics of a (queries x library) score matrix: recall@1, recall@5 and mAP over
the queries that have a copy in the library, and VSC22's micro-average precision (µAP) over
every (query, library clip) pair, negatives included, which rewards scores that are
comparable across queries; with bootstrap intervals over the queries, overall and per edit
family.

Ties are scored neutrally: every metric is its mean over all orders of the tied items, so
a tie between the right answer and a wrong one is half a hit, and a constant score is
worth what a random order is worth (neither a hit, as ``>`` would count it, nor a miss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.evaluate.ground_truth import GroundTruth

# The metrics a report compares systems on, in its column order.
METRICS = ("recall@1", "recall@5", "mAP", "uAP")
# A fixed-seed percentile bootstrap over the queries: resamples, and the interval's level.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
INTERVAL_LEVEL = 0.95


def _harmonic(n: int) -> np.ndarray:
    """H[k] = 1 + 1/2 + ... + 1/k for k = 0..n (H[0] = 0)."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])


@dataclass(frozen=True)
class _Prepared:
    """What the metrics of one score matrix need, computed once: per query with a copy its
    expected hits and average precision over tie orders; the pooled pairs sorted by score,
    in groups of equal scores. A bootstrap resample only re-weights the queries."""

    rows: np.ndarray  # (P,) the row of each query with a copy
    hit1: np.ndarray  # (P,) P(copy ranked first), over orders of the ties
    hit5: np.ndarray  # (P,) P(copy in the top 5)
    ap: np.ndarray  # (P,) E[1 / rank of the copy]
    pair_row: np.ndarray  # (Q*L,) the query of each pooled pair, best score first
    pair_true: np.ndarray  # (Q*L,) whether that pair is a query and its copy
    group_starts: np.ndarray  # (G,) where each run of equal scores begins in the pooled order
    n_queries: int
    harmonic: np.ndarray  # H[0..Q*L]


def _prepare(scores: np.ndarray, positives: Sequence[int | None]) -> _Prepared:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(positives):
        raise ValueError(f"scores {scores.shape} for {len(positives)} queries")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    n_q, n_l = scores.shape
    harmonic = _harmonic(n_q * n_l)
    rows = np.array([q for q, p in enumerate(positives) if p is not None], dtype=np.int64)
    cols = np.array([p for p in positives if p is not None], dtype=np.int64)
    target = scores[rows, cols][:, None]  # (P, 1)
    above = (scores[rows] > target).sum(axis=1)  # (P,) strictly better clips
    tied = (scores[rows] == target).sum(axis=1)  # (P,) the copy and the clips tied with it
    # The copy's rank is above + 1 + U, U uniform on 0..tied-1 over the orders of its ties.
    hit1 = np.clip((1 - above) / tied, 0, 1)
    hit5 = np.clip((5 - above) / tied, 0, 1)
    ap = (harmonic[above + tied] - harmonic[above]) / tied

    labels = np.zeros(scores.shape, dtype=bool)
    labels[rows, cols] = True
    order = np.argsort(-scores.ravel(), kind="stable")
    flat = scores.ravel()[order]
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]])) if len(flat) else np.zeros(0, np.int64)
    return _Prepared(
        rows, hit1, hit5, ap, order // max(1, n_l), labels.ravel()[order], starts, n_q, harmonic
    )  # fmt: skip


def _micro_ap(prep: _Prepared, weights: np.ndarray) -> float:
    """µAP with each query counted ``weights[q]`` times (integers), averaged over the orders
    of tied pairs: in a run of n tied pairs holding r true ones, after N pairs of which R
    true, the expected sum of precisions at the true ones is
    sum_{x=1..n} (r/n) (R + 1 + (x-1)(r-1)/(n-1)) / (N + x)."""
    w = weights[prep.pair_row].astype(np.float64)  # (Q*L,) weight of each pooled pair
    if not len(w):
        return float("nan")
    n = np.add.reduceat(w, prep.group_starts)  # (G,) weight of each run of ties
    r = np.add.reduceat(w * prep.pair_true, prep.group_starts)  # (G,) true weight in it
    total = float(r.sum())
    if total == 0:
        return float("nan")
    before_n = np.concatenate([[0.0], np.cumsum(n)[:-1]])  # N
    before_r = np.concatenate([[0.0], np.cumsum(r)[:-1]])  # R
    keep = (r > 0) & (n > 0)
    n, r, big_n, big_r = n[keep], r[keep], before_n[keep].astype(np.int64), before_r[keep]
    ni = n.astype(np.int64)
    s0 = prep.harmonic[big_n + ni] - prep.harmonic[big_n]  # sum 1/(N+x)
    s1 = n - big_n * s0  # sum x/(N+x)
    slope = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
    return float(np.sum(r / n * ((big_r + 1 - slope) * s0 + slope * s1)) / total)


def _values(prep: _Prepared, weights: np.ndarray) -> dict[str, float]:
    w = weights[prep.rows].astype(np.float64)
    if w.sum() == 0:
        recall1 = recall5 = mean_ap = float("nan")
    else:
        recall1, recall5, mean_ap = (float(w @ v / w.sum()) for v in (prep.hit1, prep.hit5, prep.ap))
    return {"recall@1": recall1, "recall@5": recall5, "mAP": mean_ap, "uAP": _micro_ap(prep, weights)}


def _positives_of(ground_truth: GroundTruth | Sequence[int | None]) -> list[int | None]:
    return ground_truth.positives if isinstance(ground_truth, GroundTruth) else list(ground_truth)


def micro_average_precision(scores: np.ndarray, positives: Sequence[int | None]) -> float:
    """VSC22's µAP: every (query, library clip) pair, pooled and sorted by score; average
    precision of the true pairs. Negative queries' pairs can only lower it."""
    prep = _prepare(scores, positives)
    return _micro_ap(prep, np.ones(prep.n_queries, dtype=np.int64))


def evaluate(scores: np.ndarray, ground_truth: GroundTruth | Sequence[int | None]) -> dict[str, float]:
    """Retrieval metrics of a (queries x library) score matrix, higher = more similar.

    ``ground_truth`` is a :class:`GroundTruth` (rows and columns in its order) or, per
    query, the column of its copy (None for a negative). recall@k and mAP are over the
    queries that have a copy (with one copy, a query's average precision is 1 / rank);
    µAP pools all pairs, negatives' included. Ties count as their mean over orders.
    """
    positives = _positives_of(ground_truth)
    prep = _prepare(scores, positives)
    n_pos = len(prep.rows)
    return {
        **_values(prep, np.ones(prep.n_queries, dtype=np.int64)),
        "queries": len(positives),
        "positives": n_pos,
        "negatives": len(positives) - n_pos,
    }


def bootstrap_intervals(
    scores: np.ndarray,
    ground_truth: GroundTruth | Sequence[int | None],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = INTERVAL_LEVEL,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of each metric of :data:`METRICS`: the queries
    resampled with replacement ``resamples`` times (a fixed ``seed``: the same intervals
    on every run), each metric recomputed on each resample (a query drawn twice counts
    twice, its pairs too), and the central ``level`` of the values kept."""
    prep = _prepare(scores, _positives_of(ground_truth))
    rng = np.random.default_rng(seed)
    n = prep.n_queries
    values: dict[str, list[float]] = {k: [] for k in METRICS}
    for _ in range(resamples if n else 0):
        weights = np.bincount(rng.integers(0, n, size=n), minlength=n)
        for k, v in _values(prep, weights).items():
            values[k].append(v)
    tail = 100 * (1 - level) / 2
    out: dict[str, tuple[float, float]] = {}
    for k, vs in values.items():
        arr = np.array(vs, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        if not len(arr):
            out[k] = (float("nan"), float("nan"))
            continue
        low, high = np.percentile(arr, [tail, 100 - tail])
        out[k] = (float(low), float(high))
    return out


@dataclass(frozen=True)
class Scored:
    """A system's metrics on a set of queries, with their bootstrap intervals."""

    metrics: dict[str, float]  # METRICS, plus the counts of queries, positives, negatives
    intervals: dict[str, tuple[float, float]]  # metric -> (low, high)


def score(
    scores: np.ndarray, ground_truth: GroundTruth | Sequence[int | None], *, resamples: int, seed: int = BOOTSTRAP_SEED
) -> Scored:
    """:func:`evaluate` and :func:`bootstrap_intervals` of one score matrix."""
    return Scored(
        evaluate(scores, ground_truth), bootstrap_intervals(scores, ground_truth, resamples=resamples, seed=seed)
    )


def score_by_family(
    scores: np.ndarray, gt: GroundTruth, *, resamples: int, seed: int = BOOTSTRAP_SEED
) -> dict[str, Scored]:
    """:func:`score` per edit family, each over the queries with that edit (negatives with
    it included, for µAP); a query with two edits counts under both."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = gt.positives
    rows: dict[str, list[int]] = {}
    for q, query in enumerate(gt.queries):
        for name in query.edits:
            rows.setdefault(name, []).append(q)
    return {
        name: score(scores[r], [positives[q] for q in r], resamples=resamples, seed=seed)
        for name, r in sorted(rows.items())
    }
