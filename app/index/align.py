"""The second stage of a search: two videos compared frame by frame.

A video is described by one unit vector per sampled frame (``app.learn.encoder``'s frame
descriptors, or any per-frame descriptor a baseline has) and the time of each frame. Two
videos are compared through their frame-similarity matrix ``S`` (query frames x candidate
frames), made comparable across queries by subtracting, per query frame, ``beta`` x how
similar that frame is to library footage in general (:func:`frame_references`, the VSC22
score-normalisation trick applied to frames: a frame that looks like everything, a black
frame or a title card, proves nothing).

The score is the chamfer similarity seen from the shorter video: each of its frames takes
its best partner in the longer one, and the score is their mean. So a clip inserted into
unrelated footage (the library clip is the shorter), a trimmed copy (the query is the
shorter), a sped-up or frame-dropped copy (best partners need not be evenly spaced) all
score as the copy they are, while footage that only shares a few frames does not. Where
the videos only overlap (part of a library video inside other footage), the overlap's
own quality counts once it spans MIN_RUN_FRAMES frames.

Localisation: the frame pairs that are each other's best partner, above the background
and near the best match, kept to the largest run of partners that are close in time in
the longer video and go forward in time in both (outliers elsewhere are dropped), give
which part of the query matches which part of the candidate, in seconds.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# How much of a query frame's similarity to library footage in general is subtracted
# (0.5 and 1.0 rank alike on the benchmark's dev part; 0.5 fuses better, app.index.rerank).
BETA = 0.5
# The background level of a query frame is its similarity to the K-th most similar
# background video (each video's best frame): the K-1 above it may be the source itself
# and its near-copies, which must not raise the bar for their own match.
BACKGROUND_RANK = 3
# A matching frame scores at least this fraction of the best frame's normalised score.
MATCH_FRACTION = 0.5
# An overlap of this many frames (or more) scores its full quality.
MIN_RUN_FRAMES = 5
# Partners further apart than this (seconds, at least; see _gap) start another run.
RUN_GAP_S = 3.0


@dataclass(frozen=True)
class Alignment:
    """How a candidate matches a query: ``score`` (chamfer of the normalised frame
    similarities from the shorter video), and the matched spans in seconds, of the query
    and of the candidate (None when no frame matches above the background)."""

    score: float
    query_span: tuple[float, float] | None = None
    candidate_span: tuple[float, float] | None = None


def unit_rows(x: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """Rows of ``x`` minus ``centre`` (the library's mean frame), L2-normalised, float32."""
    x = np.asarray(x, dtype=np.float32)
    if centre is not None:
        x = x - centre
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-6)


def frame_references(
    query: np.ndarray, background: np.ndarray, valid: np.ndarray,
    *, products: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:  # fmt: skip
    """Each query frame's background level (Tq,): its best similarity to each background
    video's frames, the :data:`BACKGROUND_RANK`-th highest over videos. ``background`` is
    (B, F_max, D) unit frames, ``valid`` (B, F_max) marks the real ones; fewer than
    BACKGROUND_RANK background videos give zeros (no normalisation). Similarities are
    ``products(query, frames)`` (default: dot products)."""
    n_videos = int(valid.any(axis=1).sum())
    if n_videos < BACKGROUND_RANK or len(query) == 0:
        return np.zeros(len(query), dtype=np.float32)
    b, f, d = background.shape
    flat = background.reshape(b * f, d)
    sims = (products(query, flat) if products is not None else query @ flat.T).reshape(len(query), b, f)
    best = np.where(valid[None], sims, -np.inf).max(axis=2)  # (Tq, B)
    return -np.partition(-best, BACKGROUND_RANK - 1, axis=1)[:, BACKGROUND_RANK - 1].astype(np.float32)


def align(
    similarity: np.ndarray,
    query_times: np.ndarray | None = None,
    candidate_times: np.ndarray | None = None,
    *,
    references: np.ndarray | None = None,
    beta: float = BETA,
) -> Alignment:
    """The :class:`Alignment` of a (Tq, Tc) frame-similarity matrix, normalised by
    subtracting ``beta`` x the query frames' ``references`` (:func:`frame_references`);
    times in seconds of each frame (default: one frame a second from 0)."""
    tq, tc = similarity.shape
    q_times = np.arange(tq, dtype=np.float64) if query_times is None else np.asarray(query_times, np.float64)
    c_times = np.arange(tc, dtype=np.float64) if candidate_times is None else np.asarray(candidate_times, np.float64)
    refs = np.zeros(tq, dtype=np.float32) if references is None else references
    by_candidate_frame = np.array(np.asarray(similarity).T[None])  # (1, Tc, Tq): one candidate, nothing padded
    return FramePairs(by_candidate_frame, [tc], q_times, [c_times], refs, beta=beta).alignment(0)


class FramePairs:
    """The frame pairs of a query with many candidates: ``similarity`` is (C, Tmax, Tq),
    one row per candidate frame, candidate c's frames in its first ``lengths[c]`` rows
    (the rest are ignored; they are overwritten). Every candidate's score comes from a
    few array operations (``scores``); its spans, a loop of their own, only when asked
    (:meth:`alignment`): a search locates the results it returns, not every candidate.

    The layout is the one a single product of the candidates' stacked frames with the
    query's gives, and it keeps each candidate's (Tmax, Tq) block contiguous: both
    directions' best partners are then found inside small blocks. A (Tq, C, Tmax) layout
    needs a transposed copy whose reads stride C x Tmax floats, a power of two for 64
    candidates of 64 frames, where the cache's sets collide (3 ms a search, against 0.1).

    Frames choose their partners by similarity itself: the normalisation, a level per
    query frame, must not pull a candidate frame towards a query frame that looks less
    like it."""

    def __init__(
        self,
        similarity: np.ndarray,
        lengths: Sequence[int],
        query_times: np.ndarray,
        candidate_times: Sequence[np.ndarray],
        references: np.ndarray,
        *,
        beta: float = BETA,
    ) -> None:
        tq, n = len(query_times), len(lengths)
        self.query_times, self.candidate_times = query_times, candidate_times
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.query_shorter = tq <= self.lengths  # (C,)
        if tq == 0 or n == 0:
            self.scores = np.full(n, -np.inf)
            return
        t_max = similarity.shape[1]
        valid = np.arange(t_max)[None, :] < self.lengths[:, None]  # (C, Tmax)
        similarity[~valid] = -np.inf  # in place: no copy of the (C, Tmax, Tq) array
        # Each query frame's partner among a candidate's frames, and each candidate
        # frame's among the query's; a pair is mutual when each is the other's partner.
        # Only the partners' similarities are normalised (a level per query frame).
        self.row_partner = similarity.argmax(axis=1)  # (C, Tq)
        self.col_partner = similarity.argmax(axis=2)  # (C, Tmax)
        row_raw = np.take_along_axis(similarity, self.row_partner[:, None, :], 1)[:, 0, :]
        col_raw = np.take_along_axis(similarity, self.col_partner[:, :, None], 2)[:, :, 0]
        self.row_best = row_raw - beta * references[None, :]
        self.col_best = col_raw - beta * references[self.col_partner]
        self.row_mutual = np.take_along_axis(self.col_partner, self.row_partner, 1) == np.arange(tq)[None, :]
        self.col_mutual = np.take_along_axis(self.row_partner, self.col_partner, 1) == np.arange(t_max)[None, :]

        # Seen from the shorter video of each pair: (C, W) arrays, W = max(Tq, Tmax).
        width = max(tq, t_max)
        shorter = self.query_shorter[:, None]

        def side(rows: np.ndarray, columns: np.ndarray, fill: float | bool) -> np.ndarray:
            out = np.full((n, width), fill, dtype=np.result_type(rows, columns))
            out[:, :tq] = np.where(shorter, rows, out[:, :tq])
            out[:, :t_max] = np.where(shorter, out[:, :t_max], columns)
            return out

        best = side(self.row_best, np.where(valid, self.col_best, -np.inf), -np.inf)
        real = side(np.ones((n, tq), dtype=bool), valid, False)
        mutual = side(self.row_mutual, self.col_mutual & valid, False) & real
        chamfer = np.where(real, best, 0.0).sum(axis=1) / real.sum(axis=1)
        top = np.where(mutual, best, -np.inf).max(axis=1)  # the best mutual pair
        matched = mutual & (best >= MATCH_FRACTION * top[:, None]) & (top[:, None] > 0)
        count = matched.sum(axis=1)
        # Where the videos only overlap, the quality of the overlap counts once it spans
        # MIN_RUN_FRAMES frames.
        quality = np.where(matched, best, 0.0).sum(axis=1) / np.maximum(count, 1)
        segment = quality * np.minimum(1.0, count / MIN_RUN_FRAMES)
        self.scores = np.where(count > 0, np.maximum(chamfer, segment), chamfer)

    def alignment(self, c: int, score: float | None = None) -> Alignment:
        """Candidate ``c``'s :class:`Alignment`, its spans included."""
        score = float(self.scores[c]) if score is None else float(score)
        if not np.isfinite(score):
            return Alignment(score)
        length, c_times = int(self.lengths[c]), np.asarray(self.candidate_times[c], dtype=np.float64)
        q_times = self.query_times
        if self.query_shorter[c]:
            spans = _spans(self.row_best[c], self.row_mutual[c], q_times, c_times[self.row_partner[c]],
                           _step(q_times), _step(c_times), _gap(c_times))  # fmt: skip
            query_span, candidate_span = spans if spans else (None, None)
        else:
            spans = _spans(self.col_best[c, :length], self.col_mutual[c, :length], c_times,
                           q_times[self.col_partner[c, :length]], _step(c_times), _step(q_times),
                           _gap(q_times))  # fmt: skip
            candidate_span, query_span = spans if spans else (None, None)
        return Alignment(score, query_span, candidate_span)


def _spans(
    best: np.ndarray,
    mutual: np.ndarray,
    short_times: np.ndarray,
    partner_times: np.ndarray,
    short_step: float,
    long_step: float,
    gap: float,
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The matched spans seen from the shorter video: ``best`` normalised similarity of
    each of its frames to its partner, which is ``mutual`` or not and shown at
    ``partner_times`` in the longer video. Returns (shorter's, longer's) or None."""
    run = _matched_run(best, mutual, partner_times, gap)
    if run is None:
        return None
    run = _in_time_order(run, short_times)
    short_span = (float(short_times[run].min()), float(short_times[run].max() + short_step))
    long_span = (float(partner_times[run].min()), float(partner_times[run].max() + long_step))
    return short_span, long_span


def _step(times: np.ndarray) -> float:
    """The sampling period of a video's frames (1 s for a single frame)."""
    return float(times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 and times[-1] > times[0] else 1.0


def _gap(times: np.ndarray) -> float:
    """Partners further apart than this (seconds) in a video sampled at ``times`` are in
    different runs: a few frame steps, or a quarter of the video (a sped-up copy with
    dropped frames leaves wide gaps between its partners)."""
    return max(RUN_GAP_S, 3 * _step(times), 0.25 * float(times[-1] - times[0]))


def _in_time_order(run: np.ndarray, short_times: np.ndarray) -> np.ndarray:
    """The run's longest part (indices, in the run's order: by partner time) whose frames
    in the shorter video also go forward in time. Every edit keeps a copy's order, so a
    pair going back (a frame beside the copied stretch paired with unrelated footage near
    its end) is not part of the match and must not stretch its spans. Longest
    non-decreasing subsequence, patience sorting: O(n log n)."""
    times = short_times[run]
    tails: list[float] = []  # the smallest last time of a subsequence of each length
    ends: list[int] = []  # its last element
    previous = np.full(len(run), -1)
    for i, t in enumerate(times):
        length = bisect.bisect_right(tails, t)
        if length == len(tails):
            tails.append(t)
            ends.append(i)
        else:
            tails[length], ends[length] = t, i
        previous[i] = ends[length - 1] if length else -1
    keep, i = [], ends[-1]
    while i >= 0:
        keep.append(i)
        i = previous[i]
    return run[np.array(keep[::-1])]


def _matched_run(best: np.ndarray, mutual: np.ndarray, partner_times: np.ndarray, gap: float) -> np.ndarray | None:
    """The shorter video's frames (indices) that match: mutual best partners, above the
    background and near the best one, kept to their partners' heaviest run in time; None
    when none match."""
    top = float(best[mutual].max()) if mutual.any() else 0.0
    if top <= 0:
        return None
    matched = np.flatnonzero(mutual & (best >= MATCH_FRACTION * top))
    order = matched[np.argsort(partner_times[matched], kind="stable")]
    breaks = np.flatnonzero(np.diff(partner_times[order]) > gap) + 1
    runs = np.split(order, breaks)
    return max(runs, key=lambda r: (float(best[r].sum()), -int(r[0])))
