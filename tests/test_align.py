"""The second stage's frame alignment on synthetic frames with known answers: scores,
spans, and the background normalisation (app.index.align, app.index.rerank)."""

from __future__ import annotations

import numpy as np
import pytest

from app.index.align import BACKGROUND_RANK, align, frame_references, unit_rows
from app.index.frames import Background, Frames, pack, unpack
from app.index.mirrors import Mirrors, mirror_basis
from app.index.rerank import rerank

DIM = 64


def _frames(rng: np.random.Generator, n: int) -> np.ndarray:
    return unit_rows(rng.standard_normal((n, DIM)))


def _noisy(frames: np.ndarray, rng: np.random.Generator, noise: float = 0.3) -> np.ndarray:
    """An edited copy of ``frames``: the same content plus noise (cosine ~0.95)."""
    return unit_rows(frames + noise * rng.standard_normal(frames.shape) / np.sqrt(DIM))


def _times(n: int, start: float = 0.0, step: float = 1.0) -> np.ndarray:
    return start + step * np.arange(n, dtype=np.float64)


def test_identity_matches_its_whole_length() -> None:
    rng = np.random.default_rng(0)
    source = _frames(rng, 20)
    a = align(_noisy(source, rng) @ source.T)
    assert a.score > 0.9
    assert a.query_span == (0.0, 20.0) and a.candidate_span == (0.0, 20.0)


def test_clip_inserted_into_other_footage_is_found_and_located() -> None:
    """The query is 10 s of other footage, 8 s of the library clip (its seconds 5-13),
    then 12 s of other footage: the library clip is the shorter video."""
    rng = np.random.default_rng(1)
    clip = _frames(rng, 20)
    query = np.concatenate([_frames(rng, 10), _noisy(clip[5:13], rng), _frames(rng, 12)])
    unrelated = _frames(rng, 20)
    found = align(query @ clip.T)
    other = align(query @ unrelated.T)
    assert found.query_span == (10.0, 18.0)
    assert found.candidate_span == (5.0, 13.0)
    assert found.score > other.score + 0.3


def test_frames_next_to_the_copied_part_are_not_located_in_it() -> None:
    """One scene: neighbouring frames look alike (a slow random walk), so the library
    clip's frames before and after the inserted part find partners inside it; only pairs
    that choose each other are located."""
    rng = np.random.default_rng(8)
    walk = unit_rows(np.cumsum(rng.standard_normal((20, DIM)), axis=0) * 0.3 + rng.standard_normal(DIM) * 2)
    query = np.concatenate([_frames(rng, 6), _noisy(walk[3:7], rng, 0.1), _frames(rng, 6)])
    a = align(query @ walk.T)
    assert a.query_span == (6.0, 10.0) and a.candidate_span == (3.0, 7.0)


def test_trimmed_copy_is_located_in_its_source() -> None:
    rng = np.random.default_rng(2)
    source = _frames(rng, 40)
    query = _noisy(source[12:27], rng)  # a 15-s trim
    a = align(query @ source.T, _times(15), _times(40))
    assert a.query_span == (0.0, 15.0) and a.candidate_span == (12.0, 27.0)
    assert a.score > 0.9


def test_sped_up_and_frame_dropped_copy_still_scores_as_a_copy() -> None:
    rng = np.random.default_rng(3)
    source = _frames(rng, 30)
    kept = np.array([i for i in range(0, 30, 2) if i not in (8, 9, 10, 20)])  # 2x speed, frames dropped
    query = _noisy(source[kept], rng)
    a = align(query @ source.T)
    assert a.score > 0.9
    assert a.candidate_span is not None and a.candidate_span[0] == 0.0 and a.candidate_span[1] >= 28.0


def test_spans_use_the_frame_times() -> None:
    """Frames sampled every 2.5 s from 100 s: spans in the video's seconds."""
    rng = np.random.default_rng(4)
    source = _frames(rng, 20)
    query = _noisy(source[4:10], rng)
    a = align(query @ source.T, _times(6, start=3.0, step=0.5), _times(20, start=100.0, step=2.5))
    assert a.query_span == (3.0, 6.0)
    assert a.candidate_span == (110.0, 125.0)  # frames 4-9: 110 s to 122.5 s, plus one step


def test_an_outlier_partner_does_not_stretch_the_span() -> None:
    """One query frame matching a far-away frame as well as its true one is left out."""
    sims = np.full((5, 40), -0.2)
    for i in range(5):
        sims[i, 20 + i] = 0.8
    sims[2, 20 + 2], sims[2, 1] = 0.1, 0.7  # frame 2's best partner is frame 1, far away
    a = align(sims)
    assert a.candidate_span == (20.0, 25.0)


def test_no_frame_above_the_background_has_no_span() -> None:
    a = align(np.full((4, 6), -0.1))
    assert a.score == pytest.approx(-0.1) and a.query_span is None and a.candidate_span is None


def test_background_levels_skip_the_source_itself() -> None:
    """A query frame's background level is its similarity to the BACKGROUND_RANK-th most
    similar background video: its own source (and a near-copy) in the background must not
    raise the bar for their own match."""
    rng = np.random.default_rng(5)
    source = _frames(rng, 10)
    query = _noisy(source, rng)
    videos = [source, _noisy(source, rng), *(_frames(rng, 10) for _ in range(10))]
    bg = Background.of(videos)
    assert bg is not None
    levels = frame_references(bg.prepare(query), bg.frames, bg.valid)
    assert BACKGROUND_RANK >= 3 and float(levels.max()) < 0.5  # unrelated videos set the level
    aligned = rerank(Frames(query, _times(10)), {1: Frames(source, _times(10)), 2: Frames(videos[5], _times(10))}, bg)
    assert (
        aligned[1].alignment.score > 0.5 and aligned[2].alignment.score < 0.2
    )  # (ranked first: the source at 0 would score ~0)


def test_normalisation_demotes_frames_that_look_like_everything() -> None:
    """Two candidates equally similar frame for frame; one matches the query only on a
    frame every background video shares (a black frame), the other on distinct content:
    normalised, the distinct match wins."""
    rng = np.random.default_rng(6)
    common = _frames(rng, 1)  # in every video: a title card
    distinct = _frames(rng, 3)
    others = [np.concatenate([common, _frames(rng, 5)]) for _ in range(8)]
    query = np.concatenate([common, distinct])
    generic = np.concatenate([common, common, common, common])  # only the title card
    real = np.concatenate([_frames(rng, 1), _noisy(distinct, rng, 0.6)])
    bg = Background.of(others)
    aligned = rerank(Frames(query, _times(4)), {1: Frames(generic, _times(4)), 2: Frames(real, _times(4))}, bg)
    assert aligned[2].alignment.score > aligned[1].alignment.score


def test_mirror_matching_is_the_best_of_the_four_mirror_images() -> None:
    """Frames whose descriptors end in mirror components are compared, centred and
    background levels alike, as the best of the query frame as it is and its three mirror
    images (flipped grids, then compared with plain cosines), and the mean frame they are
    centred on is mirror-symmetric; a mirrored copy is re-ranked as its source would be."""
    rng = np.random.default_rng(8)
    n, head = 8, 6
    basis = mirror_basis(n)
    layout = Mirrors(head, (n // 2) ** 2)

    def described(grids: np.ndarray, heads: np.ndarray) -> np.ndarray:  # (T, n, n) grids -> descriptors
        return np.concatenate([heads, grids.reshape(len(grids), -1) @ basis.T], axis=1).astype(np.float32)

    def video(t: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.normal(size=(t, n, n)), rng.normal(size=(t, head))

    videos = [video(6) for _ in range(10)]
    bg = Background.of([described(*v) for v in videos], mirrors=layout)
    plain = Background.of([described(*v) for v in videos])
    assert bg is not None and plain is not None
    np.testing.assert_allclose(layout.symmetric(bg.centre)[head:], bg.centre[head:])
    grids, heads = video(5)
    query = described(grids, heads)
    candidates = described(*video(7))
    flips = [grids, grids[:, :, ::-1], grids[:, ::-1], grids[:, ::-1, ::-1]]
    by_hand = np.max([unit_rows(candidates, bg.centre) @ unit_rows(described(g, heads), bg.centre).T for g in flips],
                     axis=0)  # fmt: skip
    np.testing.assert_allclose(bg.similarity(candidates, bg.prepare(query)), by_hand, atol=1e-5)
    levels = frame_references(bg.prepare(query), bg.frames, bg.valid, products=layout.products)
    np.testing.assert_allclose(bg.levels(bg.prepare(query)), levels)
    assert (levels >= frame_references(bg.prepare(query), bg.frames, bg.valid) - 1e-6).all()
    # A source's mirrored copy (head unchanged: only the thumbnail is mirrored) against the
    # source and an unrelated video: found under mirror matching, missed without.
    source_grids, source_heads = videos[3]
    copy = Frames(described(source_grids[:, :, ::-1], source_heads), _times(6))
    library = {1: Frames(described(*videos[3]), _times(6)), 2: Frames(described(*videos[7]), _times(6))}
    assert rerank(copy, library, bg)[1].alignment.score > 0.5
    assert rerank(copy, library, plain)[1].alignment.score < rerank(copy, library, bg)[1].alignment.score - 0.2


def test_frames_round_trip_through_storage() -> None:
    rng = np.random.default_rng(7)
    v, t = _frames(rng, 5), _times(5, 0.25, 0.5)
    blob, times = pack(v, t)
    back = unpack(blob, times, DIM)
    assert len(blob) == 5 * DIM * 2  # float16
    np.testing.assert_allclose(back.vectors, v, atol=1e-3)
    np.testing.assert_allclose(back.times, t)


def test_a_pair_going_back_in_time_does_not_stretch_the_spans() -> None:
    """Candidate seconds 4-7 copied at query seconds 7-10; the candidate's second 3 (next
    to the copy) is the mutual best partner of the query's second 11 (unrelated footage
    after it): near the copy in the query's time, but going back in the candidate's. It
    is no part of the match."""
    sim = np.full((16, 10), 0.1, dtype=np.float32)
    for c, q in zip(range(4, 8), range(7, 11), strict=True):
        sim[q, c] = 0.9
    sim[11, 3] = 0.6
    found = align(sim)
    assert found.query_span == (7.0, 11.0) and found.candidate_span == (4.0, 8.0), found
