"""Scores as the service serves them, for the benchmark: the library's vectors built into an
index version (:func:`app.index.build.build_version`, the deployment's ``IndexParams``),
opened as a worker opens it (checksums, memory maps), searched for each query (graph or
exact scan, re-ranking where the parameters ask for it, with the library's own vectors
standing in for the database's embeddings), and each hit's cosine
calibrated against the version's background sample (:mod:`app.index.calibrate`), the
score a client thresholds. The serving filters (enabled videos, a collection, the query's
own video) drop nothing here: every benchmark clip is eligible and no query is in the
library.

Systems that are no vectors (the perceptual hash) get the same calibration from their
score matrix: :func:`calibrated_rows`.

The second stage (:func:`second_stage`) then re-ranks each query's first
``SecondStage.candidates`` by frame alignment with :func:`app.index.rerank.rerank`, the
function serving calls, against a background sample of the library's frames: every
system with frames (the encoders' frame descriptors, tiny frames' and pHash's per-frame
codes) gets it, and every system whose frames are thumbnails (the encoders' that carry
them in mirror components, and tiny frames) is matched under mirror images alike.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.index.align import BETA
from app.index.build import build_version
from app.index.calibrate import CALIBRATION_PERCENTILE, calibrate, calibration_reference
from app.index.frames import BACKGROUND_VIDEOS, Background, Frames
from app.index.mirrors import Mirrors
from app.index.params import IndexParams
from app.index.rerank import rerank
from app.index.version import IndexVersionFiles


def served_scores(queries: np.ndarray, library: np.ndarray, *, params: IndexParams) -> np.ndarray:
    """(Q, L) calibrated scores of ``queries`` (Q, D) against ``library`` (L, D), column j
    for library row j, through an index version built with ``params``. A clip the search
    did not return for a query scores below every one it did."""
    n_q, n_l = len(queries), len(library)
    out = np.zeros((n_q, n_l), dtype=np.float64)
    if n_q == 0 or n_l == 0:
        return out
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        built = build_version(
            keys=np.arange(n_l, dtype=np.uint64), vectors=library, directory=Path(tmp) / "v", params=params
        )
        version = IndexVersionFiles.view(built.path, sha256=built.sha256, dim=built.dim)
        stored = np.asarray(library, dtype=np.float32)  # the system of record, for re-ranking from "the database"
        keys, cosines = version.search_batch(
            np.asarray(queries, dtype=np.float32), n_l, vectors_of=lambda ids: stored[ids]
        )  # (Q, L) each
        calibrated = np.stack(
            [np.asarray(calibrate(c.astype(np.float64), calibration_reference(q, version.background)))
             for q, c in zip(queries, cosines, strict=True)]
        )  # fmt: skip
    found = keys >= 0
    floor = float(np.min(calibrated[found])) - 1.0 if found.any() else 0.0
    out[:] = floor
    rows = np.broadcast_to(np.arange(n_q)[:, None], keys.shape)
    out[rows[found], keys[found]] = calibrated[found]
    return out


def calibrated_rows(scores: np.ndarray, *, params: IndexParams) -> np.ndarray:
    """A (Q, L) similarity matrix calibrated as served scores are: each row against its
    ``CALIBRATION_PERCENTILE``-th percentile over a background sample of the library's
    columns, drawn as :func:`app.index.build.build_version` draws the index's."""
    scores = np.asarray(scores, dtype=np.float64)
    n_l = scores.shape[1]
    if n_l < 2:
        return scores
    rng = np.random.default_rng(params.seed + 1)
    background = np.sort(rng.choice(n_l, min(n_l, params.background), replace=False))
    references = np.minimum(np.percentile(scores[:, background], CALIBRATION_PERCENTILE, axis=1), 1.0 - 1e-6)
    return np.stack([np.asarray(calibrate(row, float(t))) for row, t in zip(scores, references, strict=True)])


@dataclass(frozen=True)
class SecondStage:
    """How the benchmark re-ranks, as serving does: ``candidates`` per query (0: the first
    stage only, settings.rerank_candidates when serving) and ``beta`` (0: frames compared
    without the background normalisation)."""

    candidates: int = 64
    beta: float = BETA


def second_stage(
    first: np.ndarray,
    query_frames: Sequence[np.ndarray],
    library_frames: Sequence[np.ndarray],
    *,
    stage: SecondStage,
    seed: int = 0,
    fps: float = 1.0,
    mirrors: Mirrors | None = None,
) -> np.ndarray:
    """(Q, L) scores: each query's top ``stage.candidates`` columns of the first stage's
    ``first`` (calibrated scores) re-ranked by their frame-alignment score with the query,
    fused with ``first`` as serving fuses them, the others below every re-ranked one.
    Frames are (T_i, D) per clip, sampled ``fps`` a second, compared under their mirror
    images where ``mirrors`` says where their mirror components are."""
    first = np.asarray(first, dtype=np.float64)
    n_q, n_l = first.shape
    if stage.candidates <= 0 or n_q == 0 or n_l == 0:
        return first
    rng = np.random.default_rng(seed + 2)
    sample = np.sort(rng.choice(n_l, min(n_l, BACKGROUND_VIDEOS), replace=False))
    background = Background.of([library_frames[j] for j in sample], mirrors=mirrors)

    def frames_of(x: np.ndarray) -> Frames:
        return Frames(np.asarray(x, dtype=np.float32), np.arange(len(x), dtype=np.float64) / fps)

    library = [frames_of(x) for x in library_frames]
    out = np.full((n_q, n_l), np.nan)
    for i in range(n_q):
        top = np.argsort(-first[i], kind="stable")[: stage.candidates]
        aligned = rerank(frames_of(query_frames[i]), {int(j): library[j] for j in top}, background,
                         first={int(j): float(first[i, j]) for j in top}, locate=0, beta=stage.beta)  # fmt: skip
        for j, r in aligned.items():
            out[i, j] = r.fused
    scored = ~np.isnan(out)
    out[~scored] = float(np.min(out[scored])) - 1.0 if scored.any() else 0.0
    return out
