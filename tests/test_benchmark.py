"""The retrieval benchmark (app.evaluate): metrics against hand-computed examples, a plain reference and
every order of their ties; bootstrap intervals of a known case; the split by source; the served path against
the dense matrix; the generator and an end-to-end run on a tiny benchmark cut from real encoded videos; and
the guards that keep benchmark footage out of training."""

from __future__ import annotations

import io
import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.evaluate.edits import DEFAULT_EDITS, HELD_OUT_EDITS, TRAINED_BY
from app.evaluate.generate import generate
from app.evaluate.ground_truth import GroundTruth
from app.evaluate.metrics import METRICS, bootstrap_intervals, evaluate, micro_average_precision
from app.evaluate.plan import Plan, Source, plan_benchmark, split_sources
from app.evaluate.run import run
from app.evaluate.served import SecondStage, calibrated_rows, second_stage, served_scores
from app.evaluate.systems import build_systems, phash_bits, phash_similarity, tiny_frames_descriptor
from app.media.register import file_sha256
from app.media.video import sample_frames

try:
    from tests.media import make_video
except ModuleNotFoundError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from support.media import make_video

# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------

# 3 queries x 4 library clips. q0's copy is clip 0 (rank 1), q1's is clip 2 (rank 3),
# q2 is a negative whose best score, 0.95, is the highest of all.
SCORES = np.array(
    [
        [0.90, 0.10, 0.20, 0.30],
        [0.50, 0.60, 0.40, 0.10],
        [0.95, 0.00, 0.00, 0.00],
    ]
)
POSITIVES = [0, 2, None]


def test_metrics_match_a_hand_computed_example() -> None:
    m = evaluate(SCORES, POSITIVES)
    assert m["recall@1"] == pytest.approx(1 / 2)
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["mAP"] == pytest.approx((1 + 1 / 3) / 2)
    # All 12 pairs by score: 0.95 (q2, false), 0.90 (q0, TRUE: precision 1/2), 0.60, 0.50,
    # 0.40 (q1, TRUE: 2/5), ... -> µAP = (1/2 + 2/5) / 2.
    assert m["uAP"] == pytest.approx((1 / 2 + 2 / 5) / 2)
    assert (m["queries"], m["positives"], m["negatives"]) == (3, 2, 1)


def test_a_confident_negative_lowers_micro_ap_but_not_recall() -> None:
    without = evaluate(SCORES[:2], POSITIVES[:2])
    with_negative = evaluate(SCORES, POSITIVES)
    assert without["uAP"] == pytest.approx((1 + 2 / 4) / 2)
    assert with_negative["uAP"] < without["uAP"]
    for k in ("recall@1", "recall@5", "mAP"):
        assert with_negative[k] == without[k]
    # A negative scored below every true pair costs nothing.
    quiet = SCORES.copy()
    quiet[2] = 0.0
    assert evaluate(quiet, POSITIVES)["uAP"] == pytest.approx(without["uAP"])


def test_ties_are_scored_neutrally() -> None:
    # A tie between the right answer and a wrong one is half a hit, not a hit (nor a miss).
    m = evaluate(np.array([[0.5, 0.5, 0.1]]), [0])
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["mAP"] == pytest.approx((1 + 1 / 2) / 2)
    # A constant score: every ordering of the 6 clips equally likely.
    m = evaluate(np.ones((2, 6)), [3, None])
    assert m["recall@1"] == pytest.approx(1 / 6) and m["recall@5"] == pytest.approx(5 / 6)
    assert m["mAP"] == pytest.approx(sum(1 / r for r in range(1, 7)) / 6)
    assert m["uAP"] == pytest.approx(sum(1 / r for r in range(1, 13)) / 12)  # the true pair anywhere in 12


def _orderings(scores: np.ndarray) -> list[np.ndarray]:
    """Every order of the flattened pairs by descending score, ties in every order."""
    flat = scores.ravel()
    groups = [list(np.flatnonzero(flat == v)) for v in sorted(set(flat.tolist()), reverse=True)]
    return [np.concatenate(p) for p in itertools.product(*(itertools.permutations(g) for g in groups))]


def test_tied_metrics_are_the_mean_over_every_tie_order() -> None:
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 3, size=(3, 3)).astype(float)  # few values: many ties
    positives: list[int | None] = [0, 2, None]
    truth = np.zeros(scores.shape, dtype=bool)
    truth[0, 0] = truth[1, 2] = True
    orders = _orderings(scores)
    assert len(orders) > 10
    uaps, r1s, aps = [], [], []
    for order in orders:
        hits = truth.ravel()[order]
        uaps.append(np.sum(np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)) / 2)
        rank = {int(i): n for n, i in enumerate(order)}  # place in the pooled order
        per_query = []
        for q, p in ((0, 0), (1, 2)):
            place = rank[q * 3 + p]
            ahead = sum(rank[q * 3 + c] < place for c in range(3))  # its own row, in this order
            per_query.append(ahead + 1)
        r1s.append(np.mean([r == 1 for r in per_query]))
        aps.append(np.mean([1 / r for r in per_query]))
    m = evaluate(scores, positives)
    assert m["uAP"] == pytest.approx(np.mean(uaps))
    assert m["recall@1"] == pytest.approx(np.mean(r1s))
    assert m["mAP"] == pytest.approx(np.mean(aps))


def test_bootstrap_interval_of_a_known_case() -> None:
    # One hit and one miss: resamples of two queries hold 0, 1 or 2 hits (p 1/4, 1/2,
    # 1/4), so the 95 % interval of recall@1 spans [0, 1].
    scores = np.array([[0.9, 0.1], [0.9, 0.1]])
    low, high = bootstrap_intervals(scores, [0, 1], resamples=1000, seed=0)["recall@1"]
    assert (low, high) == (0.0, 1.0)
    # Every query a hit: no spread at all.
    assert bootstrap_intervals(scores, [0, 0], resamples=200, seed=0)["recall@1"] == (1.0, 1.0)
    # 400 queries, half of them hits: the normal approximation, 0.5 +- 1.96 * sqrt(.25 / 400).
    half = np.tile(scores, (200, 1))
    positives = [0, 1] * 200
    low, high = bootstrap_intervals(half, positives, resamples=1000, seed=0)["recall@1"]
    assert low == pytest.approx(0.5 - 0.049, abs=0.012) and high == pytest.approx(0.5 + 0.049, abs=0.012)
    # Fixed seed: the same interval every time; and every metric has one around its value.
    again = bootstrap_intervals(half, positives, resamples=1000, seed=0)
    assert again["recall@1"] == (low, high)
    point = evaluate(half, positives)
    for k in METRICS:
        assert again[k][0] <= point[k] <= again[k][1]


def _reference_micro_ap(scores: np.ndarray, positives: list[int | None]) -> float:
    """Plain re-implementation: walk the pairs by descending score, count hits."""
    pairs = [(s, p == c) for q, p in enumerate(positives) for c, s in enumerate(scores[q])]
    pairs.sort(key=lambda x: -x[0])
    hits, total = 0, 0.0
    for n, (_, is_copy) in enumerate(pairs, start=1):
        if is_copy:
            hits += 1
            total += hits / n
    return total / sum(p is not None for p in positives)


def test_metrics_match_a_reference_and_are_invariant() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(30, 12))
    positives: list[int | None] = [int(p) for p in rng.integers(0, 12, size=30)]
    positives[::4] = [None] * len(positives[::4])
    m = evaluate(scores, positives)
    assert m["uAP"] == pytest.approx(_reference_micro_ap(scores, positives))
    # Invariant to a monotone change of the scores, and to the library's order.
    assert evaluate(np.tanh(3 * scores) + 7, positives) == pytest.approx(m)
    perm = rng.permutation(12)
    where = np.argsort(perm)  # column of old clip c after permuting
    moved = [None if p is None else int(where[p]) for p in positives]
    assert evaluate(scores[:, perm], moved) == pytest.approx(m)
    assert micro_average_precision(scores, positives) == pytest.approx(m["uAP"])


# ---------------------------------------------------------------------------------------
# Baseline descriptors
# ---------------------------------------------------------------------------------------


def test_baselines_score_a_clip_against_itself_highest() -> None:
    rng = np.random.default_rng(1)
    clips = [rng.integers(0, 256, size=(t, 32, 32, 3), dtype=np.uint8) for t in (3, 5, 2)]
    d, frames = tiny_frames_descriptor(clips)
    assert d.shape == (3, 256) and [f.shape for f in frames] == [(3, 256), (5, 256), (2, 256)]
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-5)
    assert phash_bits(clips[0]).shape == (3, 64)
    sim = phash_similarity(clips[:2], clips)
    assert sim.shape == (2, 3)
    np.testing.assert_allclose(np.diag(sim[:, :2]), 1.0)
    assert (sim >= 0).all() and (sim <= 1).all()
    # A sub-clip (a query cut from a library clip) still matches it perfectly.
    assert phash_similarity([clips[1][1:3]], clips)[0].argmax() == 1


# ---------------------------------------------------------------------------------------
# Generation and an end-to-end run
# ---------------------------------------------------------------------------------------

EDITS = ("insertion", "hflip", "crop", "blur", "speed_up")
PATTERNS = (("a", "testsrc2"), ("b", "mandelbrot"), ("c", "life=seed=7:mold=10"), ("d", "cellauto=rule=30"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 6-s moving videos: 3 segments of 2 s each, two sources per part."""
    d = tmp_path_factory.mktemp("sources")
    for name, pattern in PATTERNS:
        make_video(d / f"{name}.mp4", seconds=6, width=160, height=120, pattern=pattern)
    return d


@pytest.fixture(scope="module")
def bench(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    return generate(
        sources, out, seed=3, segment_s=2.0, queries_per_video=2, negatives=3, edits=EDITS,
        show_progress=False,
    )  # fmt: skip


def _plan(sources: list[Source], *, seed: int, queries_per_video: int = 3) -> Plan:
    return plan_benchmark(
        sources, out_dir=Path("/bench"), seed=seed, segment_s=2.0, queries_per_video=queries_per_video,
        negatives=8, edits=EDITS, max_segments_per_video=15, holdout_sources=None, holdout_fraction=0.2,
        two_edit_prob=0.4,
    )  # fmt: skip


def test_sources_are_split_into_parts_by_seed_and_each_part_stands_alone() -> None:
    durations = [6, 6, 8, 10, 12, 14, 20, 30, 4, 7]
    sources = [Source(f"s{i}", Path(f"/footage/s{i}.mp4"), float(d)) for i, d in enumerate(durations)]
    splits = set()
    for seed in range(6):
        plan = _plan(sources, seed=seed)
        assert plan.parts == _plan(sources, seed=seed).parts  # deterministic
        assert plan.parts == _plan(sources, seed=seed, queries_per_video=5).parts  # from the seed alone
        assert plan.parts == split_sources(sources, segment_s=2.0, seed=seed)
        assert plan.parts.count("dev") == plan.parts.count("test") == 5  # paired by length
        splits.add(tuple(plan.parts))
        part_of = {s.path: p for s, p in zip(sources, plan.parts, strict=True)}
        clip_part = {clip_id: plan.parts[span.source] for clip_id, span in plan.library}
        assert {clip_part[c] for c in clip_part} == {"dev", "test"}
        for q in plan.queries:
            assert q.part == plan.parts[q.source]
            if q.positive is not None:
                assert clip_part[q.positive] == q.part  # a query copies a clip of its own part
            if q.filler is not None and q.filler.path is not None:
                assert part_of[q.filler.path] == q.part  # and is wrapped in footage of its part
        assert {q.part for q in plan.queries if q.positive is None} == {"dev", "test"}
    assert len(splits) > 1  # another seed, another split
    # A single source cannot be split: all of it is dev, there is no test part to claim.
    assert split_sources(sources[:1], segment_s=2.0, seed=0) == ["dev"]


def test_generated_ground_truth_is_consistent(sources: Path, bench: Path) -> None:
    gt = GroundTruth.load(bench)
    ids = [c.id for c in gt.library]
    assert len(ids) == len(set(ids)) == 8  # 3 segments per source, one held out of each
    assert {c.source for c in gt.library} == {"a", "b", "c", "d"}
    positives = [q for q in gt.queries if q.positive is not None]
    negatives = [q for q in gt.queries if q.positive is None]
    assert len(positives) == 8 and len(negatives) == 3
    for q in positives:
        assert q.positive in ids
        assert q.source == q.positive.split("-")[0]
    library_starts = {(c.source, c.start_s) for c in gt.library}
    for q in negatives:  # cut from held-out segments, never from a library clip
        segment_start = (q.source, float(int(q.start_s // 2.0) * 2))
        assert segment_start not in library_starts
    for q in gt.queries:
        assert set(q.edits) <= set(EDITS)
        assert q.path.stem == q.id  # a query file name does not give its answer away
    for item in [*gt.library, *gt.queries]:
        assert item.path.is_file() and item.path.is_relative_to(bench.parent)
    raw = json.loads(bench.read_text())
    assert all(not Path(c["path"]).is_absolute() for c in raw["library"] + raw["queries"])

    # The split: recorded per source, by content; every clip and query in its source's part.
    part = {s.name: s.part for s in gt.sources}
    assert sorted(part.values()) == ["dev", "dev", "test", "test"]
    for s in gt.sources:
        assert (s.sha256, s.bytes) == (
            file_sha256(sources / f"{s.name}.mp4"),
            (sources / f"{s.name}.mp4").stat().st_size,
        )
    for item in [*gt.library, *gt.queries]:
        assert item.part == part[item.source]
        assert item.sha256 == file_sha256(item.path) and item.bytes == item.path.stat().st_size
    assert gt.parts == ["dev", "test"]
    for name in gt.parts:
        sub = gt.part(name)
        assert {c.part for c in sub.library} == {q.part for q in sub.queries} == {name}
        assert all(p is not None and p < len(sub.library) for p in sub.positives if p is not None)

    # The insertion wraps the copy in another video: the query is longer than the copy.
    inserted = next(q for q in gt.queries if "insertion" in q.edits and "speed_up" not in q.edits)
    sample = sample_frames(inserted.path, fps=1.0, size=32)
    assert sample.info.duration_s > inserted.duration_s + 1.5


def test_generation_is_deterministic(sources: Path, bench: Path, tmp_path: Path) -> None:
    def answers(path: Path) -> list[tuple]:
        gt = GroundTruth.load(path)
        return [(q.id, q.edit, q.positive, q.start_s, q.duration_s, q.part) for q in gt.queries]

    args = {"segment_s": 2.0, "queries_per_video": 2, "negatives": 3, "edits": EDITS}
    again = generate(sources, tmp_path / "again", seed=3, show_progress=False, **args)
    assert answers(again) == answers(bench)
    other = generate(sources, tmp_path / "other", seed=4, show_progress=False, **args)
    assert answers(other) != answers(bench)
    # Unchanged sources and parameters: the benchmark is reused, not re-cut.
    mtime = again.stat().st_mtime_ns
    assert generate(sources, tmp_path / "again", seed=3, show_progress=False, **args) == again
    assert again.stat().st_mtime_ns == mtime


def test_every_edit_is_trained_or_named_held_out() -> None:
    from app.learn.augment import ClipAugment

    augment = ClipAugment(64)
    for edit, knob in TRAINED_BY.items():
        assert edit in DEFAULT_EDITS and hasattr(augment, knob), (edit, knob)
    assert set(HELD_OUT_EDITS) == set(DEFAULT_EDITS) - set(TRAINED_BY)
    assert {"insertion", "rotate", "vflip", "noise", "overlay_shapes", "speed_up"} <= set(HELD_OUT_EDITS)


# ---------------------------------------------------------------------------------------
# The served path, and the same pipeline for every system
# ---------------------------------------------------------------------------------------


def test_served_path_ranks_as_the_dense_matrix_does() -> None:
    from app.index.params import IndexParams

    rng = np.random.default_rng(2)
    library = rng.normal(size=(60, 16)).astype(np.float32)
    queries = (library[rng.integers(0, 60, size=20)] + 0.3 * rng.normal(size=(20, 16))).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    dense = unit(queries) @ unit(library).T  # (Q, L) cosines: what the benchmark scored before
    expected = calibrated_rows(dense, params=IndexParams())  # the served calibration of those
    # f32 storage, exact scan and graph walk, and hash codes re-ranked with the embeddings
    # (from the "database": the benchmark's own vectors): the same scores, the same rankings.
    for params in (
        IndexParams(dtype="f32"),
        IndexParams(dtype="f32", exact_below=0),
        IndexParams(mode="hash", rerank=100, rerank_from="database", exact_below=0),
    ):
        served = served_scores(queries, library, params=params)
        np.testing.assert_allclose(served, expected, atol=1e-5)
        np.testing.assert_array_equal(np.argsort(-served, axis=1)[:, :10], np.argsort(-expected, axis=1)[:, :10])
    # The calibration keeps each query's order of the raw cosines.
    np.testing.assert_array_equal(np.argsort(-expected, axis=1), np.argsort(-dense, axis=1))
    # The default f16 storage moves scores by rounding only.
    served = served_scores(queries, library, params=IndexParams())
    np.testing.assert_allclose(served, expected, atol=5e-3)
    positives = [int(p) for p in np.argmax(dense, axis=1)]
    assert evaluate(served, positives)["recall@1"] == pytest.approx(evaluate(expected, positives)["recall@1"], abs=0.05)


def test_the_untrained_baseline_gets_the_trained_pipeline(tmp_path: Path) -> None:
    from app.index.params import IndexParams
    from app.learn.encoder import EncoderConfig, initial_encoder, save_checkpoint

    config = EncoderConfig(frame_size=32, embed_dim=32, projector_hidden=32, library_norm="centre+whiten")
    ckpt = save_checkpoint(tmp_path / "enc.pt", initial_encoder(config, seed=1))
    params = IndexParams(dtype="f32")
    systems = build_systems({"trained": ckpt}, ["untrained"], 8, params=params)
    untrained = systems[1]
    rng = np.random.default_rng(4)
    library = [rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8) for _ in range(6)]
    queries = [np.ascontiguousarray(c[:, :, ::-1]) for c in library[:3]]  # mirrored copies
    # By hand: the same network, its centring and whitening fitted on this library, its
    # first stage re-ranked by the frame descriptors of the same forward pass.
    model = initial_encoder(config)
    model.fit_library_norm(library)
    (qv, qf), (lv, lf) = model.describe(queries), model.describe(library)
    first = served_scores(qv, lv, params=params)
    expected = second_stage(first, qf, lf, stage=SecondStage(), seed=params.seed)
    np.testing.assert_allclose(untrained.score_matrix(queries, library), expected, atol=1e-5)
    # The first stage keeps its order of the candidates it hands on only where frames agree.
    assert not np.allclose(expected, first)


# ---------------------------------------------------------------------------------------
# An end-to-end run
# ---------------------------------------------------------------------------------------


def test_distractors_join_both_libraries_whole_and_move_no_query(sources: Path, bench: Path, tmp_path: Path) -> None:
    # Whole videos no query copies, as a real library holds them beside the copied ones.
    extra = tmp_path / "others"
    extra.mkdir()
    for i, pattern in enumerate(("rgbtestsrc", "smptebars", "life=seed=3:mold=5", "cellauto=rule=90", "testsrc")):
        make_video(extra / f"other{i}.mp4", seconds=3, width=160, height=120, pattern=pattern)
    args = {"segment_s": 2.0, "queries_per_video": 2, "negatives": 3, "edits": EDITS, "show_progress": False}
    path = generate(sources, tmp_path / "bench", seed=3, distractors=extra, distractors_per_part=2, **args)
    gt, plain = GroundTruth.load(path), GroundTruth.load(bench)
    distractors = [c for c in gt.library if c.distractor]
    assert len(distractors) == 4 and sorted(c.part for c in distractors) == ["dev", "dev", "test", "test"]
    originals = {file_sha256(f): f for f in extra.glob("*.mp4")}
    for c in distractors:
        assert c.sha256 in originals and c.path.is_relative_to(path.parent)  # whole, and the benchmark's own
        assert c.duration_s == pytest.approx(3.0, abs=0.1) and c.source == c.id
    # The clips and queries are the ones the benchmark has without them; no query copies one.
    assert [(q.id, q.edit, q.positive, q.part) for q in gt.queries] == [
        (q.id, q.edit, q.positive, q.part) for q in plain.queries
    ]
    assert [c.id for c in gt.library if not c.distractor] == [c.id for c in plain.library]
    for name in gt.parts:
        sub, alone = gt.part(name), plain.part(name)
        assert [sub.library[p].id if p is not None else None for p in sub.positives] == [
            alone.library[p].id if p is not None else None for p in alone.positives
        ]
    # The test part's distractors are test footage: training must not see them either.
    forbidden = gt.forbidden_in_training()
    assert {c.sha256 for c in distractors if c.part == "test"} <= set(forbidden)
    assert not {c.sha256 for c in distractors if c.part == "dev"} & set(forbidden)
    assert "test-part distractor" in forbidden[next(c.sha256 for c in distractors if c.part == "test")]
    # Reused while nothing changed; another cap is another benchmark.
    mtime = path.stat().st_mtime_ns
    assert generate(sources, tmp_path / "bench", seed=3, distractors=extra, distractors_per_part=2, **args) == path
    assert path.stat().st_mtime_ns == mtime
    generate(sources, tmp_path / "bench", seed=3, distractors=extra, **args)
    assert sum(c.distractor for c in GroundTruth.load(path).library) == 5
    # A run counts them apart from the copied sources.
    report = run(path, out_dir=tmp_path / "report", baselines=("tiny_frames",), resamples=50, show_progress=False)
    for name, part in report.parts.items():
        sub = GroundTruth.load(path).part(name)
        assert part.counts["distractors"] == sum(c.distractor for c in sub.library)
        assert part.counts["library"] == len(sub.library) and part.sources == sorted(s.name for s in sub.sources)
    assert "distractors)" in (tmp_path / "report" / "report.md").read_text()


def test_run_reports_both_parts_with_intervals_and_families(bench: Path, tmp_path: Path) -> None:
    from app.learn.encoder import EncoderConfig, initial_encoder, save_checkpoint

    # A stand-in "trained" checkpoint at 32x32 frames, so the whole run stays fast.
    config = EncoderConfig(frame_size=32, embed_dim=32, projector_hidden=32, library_norm="centre+whiten")
    ckpt = save_checkpoint(tmp_path / "enc.pt", initial_encoder(config, seed=1))
    report = run(bench, out_dir=tmp_path / "report", checkpoints={"trained": ckpt}, resamples=200,
                 show_progress=False)  # fmt: skip
    gt = GroundTruth.load(bench)
    assert list(report.parts) == ["dev", "test"]
    for name, part in report.parts.items():
        sub = gt.part(name)
        assert part.sources == sorted(s.name for s in sub.sources)
        assert list(part.systems) == ["trained", "untrained", "tiny frames", "pHash"]
        for s in part.systems.values():
            m = s.metrics
            assert 0 <= m["recall@1"] <= m["recall@5"] <= 1
            assert 0 < m["uAP"] <= 1 and 0 < m["mAP"] <= 1
            assert (m["positives"], m["negatives"]) == (4, sum(q.positive is None for q in sub.queries))
            for k in METRICS:
                low, high = s.intervals[k]
                assert low <= m[k] + 1e-9 and m[k] <= high + 1e-9
        families = part.families["trained"]
        assert set(families) == {e for q in sub.queries for e in q.edits}
        for f in families.values():
            assert set(f.intervals) == set(METRICS)
        assert set(report.margins(name)) == {"trained"}
    assert "insertion" in report.held_out and "crop" not in report.held_out
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["parts"]["test"]["metrics"]["pHash"] == pytest.approx(report.parts["test"].systems["pHash"].metrics)
    assert data["bootstrap"]["resamples"] == 200 and data["index"]["mode"] == "hnsw"
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert markdown.index("## test part") < markdown.index("## dev part")
    assert "| pHash |" in markdown and "margin over the best baseline" in markdown
    assert "| insertion † |" in markdown or "| insertion † | " in markdown
    for name in ("report.png", "families-dev.png", "families-test.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"


TINY_TRAINING = {
    "frames": 2, "batch_size": 4, "num_workers": 0, "torch_threads": 1,
}  # fmt: skip


def _tiny_config(steps: int) -> Any:
    from app.learn.encoder import EncoderConfig
    from app.learn.train.config import TrainConfig

    encoder = EncoderConfig(frame_size=32, embed_dim=32, projector_hidden=32)
    return TrainConfig.preset("cpu-small", encoder=encoder, steps=steps, epochs=None, **TINY_TRAINING)


def test_finetune_trains_on_the_dev_part_library_only(
    bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.learn.train.loop as train_module
    from app.evaluate.run import finetune_on_library
    from app.learn.encoder import EncoderConfig

    seen: list[Path] = []
    real_train = train_module.train

    def recording_train(config, videos, **kwargs):  # type: ignore[no-untyped-def]
        seen.extend(videos)
        return real_train(config, videos, **kwargs)

    monkeypatch.setattr(train_module, "train", recording_train)
    tiny = {"encoder": EncoderConfig(frame_size=32, embed_dim=32, projector_hidden=32), **TINY_TRAINING}
    result = finetune_on_library(bench, tmp_path / "ft", steps=2, overrides=tiny)
    gt = GroundTruth.load(bench)
    assert sorted(seen) == sorted(c.path for c in gt.part("dev").library)  # no query, no test footage
    assert result.steps == 2 and result.videos == len(gt.part("dev").library)
    report = run(
        bench, out_dir=tmp_path / "report", checkpoints={"finetuned": result.checkpoint},
        baselines=["untrained"], resamples=50, show_progress=False,
    )  # fmt: skip
    assert list(report.parts["test"].systems) == ["finetuned", "untrained"]


# ---------------------------------------------------------------------------------------
# Guards: what training refuses
# ---------------------------------------------------------------------------------------


@pytest.fixture
def benchmarks_setting(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Sets VIDSIM_BENCHMARKS for one test (settings are read once per process)."""
    from app.config import get_settings

    def set_to(value: str) -> None:
        monkeypatch.setenv("VIDSIM_BENCHMARKS", value)
        get_settings.cache_clear()

    yield set_to
    monkeypatch.delenv("VIDSIM_BENCHMARKS", raising=False)
    get_settings.cache_clear()


def test_training_refuses_benchmark_queries_and_test_footage(
    sources: Path, bench: Path, tmp_path: Path, benchmarks_setting: Any
) -> None:
    from app.learn.train.guards import TrainingVideosRefused, refuse_benchmark_footage
    from app.learn.train.loop import train

    gt = GroundTruth.load(bench)
    dev, test = gt.part("dev"), gt.part("test")
    renamed = tmp_path / "holiday.mp4"  # a query under another name, elsewhere
    shutil.copyfile(gt.queries[0].path, renamed)
    forbidden = {
        gt.queries[0].path: "query q000",
        renamed: "query q000",
        sources / f"{test.sources[0].name}.mp4": f"test-part source {test.sources[0].name}",
        test.library[0].path: f"library clip {test.library[0].id} of test-part source",
    }
    allowed = [c.path for c in dev.library] + [sources / f"{s.name}.mp4" for s in dev.sources]
    refuse_benchmark_footage(allowed, [bench])  # the dev part's footage may be trained on
    for path, what in forbidden.items():
        with pytest.raises(TrainingVideosRefused, match=f"{re.escape(str(path))} is {what}"):
            refuse_benchmark_footage([*allowed, path], [bench])
    # Every training run, through VIDSIM_BENCHMARKS (a folder is searched for benchmarks).
    benchmarks_setting(str(bench.parent.parent))
    out = tmp_path / "run"
    with pytest.raises(TrainingVideosRefused, match="refusing to train on 1 benchmark video"):
        train(_tiny_config(1), [*(c.path for c in dev.library), renamed], out_dir=out)
    assert not (out / "last.pt").exists()
    # A guard that guards nothing is refused too.
    (tmp_path / "empty").mkdir()
    benchmarks_setting(str(tmp_path / "empty"))
    with pytest.raises(TrainingVideosRefused, match=r"holds no ground_truth\.json"):
        train(_tiny_config(1), [c.path for c in dev.library], out_dir=out)


def test_a_resumed_run_refuses_another_video_list(bench: Path, tmp_path: Path) -> None:
    from app.learn.train.guards import VIDEO_LIST, TrainingVideosRefused
    from app.learn.train.loop import train

    videos = [c.path for c in GroundTruth.load(bench).part("dev").library]
    out = tmp_path / "run"
    first = train(_tiny_config(1), videos[:3], out_dir=out)
    assert first.steps == 1 and json.loads((out / VIDEO_LIST).read_text())["count"] == 3
    with pytest.raises(TrainingVideosRefused, match=r"started on 3 videos .*gives 4: 1 added"):
        train(_tiny_config(2), videos[:4], out_dir=out, resume=True)
    with pytest.raises(TrainingVideosRefused, match="the same videos in another order"):
        train(_tiny_config(2), videos[:3][::-1], out_dir=out, resume=True)
    with pytest.raises(TrainingVideosRefused, match="1 removed"):
        train(_tiny_config(2), videos[:2], out_dir=out, resume=True)
    assert train(_tiny_config(2), videos[:3], out_dir=out, resume=True).steps == 2  # the same list resumes


def test_summary_over_seeds_reports_means_and_per_seed_margins(tmp_path: Path) -> None:
    from rich.console import Console

    from scripts.bench_retrieval import _summarise

    def report(trained: float, untrained: float, tiny: float) -> dict:
        values = {"finetuned": trained, "untrained": untrained, "tiny frames": tiny}
        metrics = {n: dict.fromkeys(METRICS, v) for n, v in values.items()}
        shifted = {n: dict.fromkeys(METRICS, v / 2) for n, v in values.items()}
        return {"parts": {"test": {"metrics": metrics}, "dev": {"metrics": shifted}},
                "baselines": ["untrained", "tiny frames"]}  # fmt: skip

    _summarise({0: report(0.8, 0.7, 0.5), 1: report(0.6, 0.4, 0.7)}, tmp_path, Console(file=io.StringIO()))
    summary = json.loads((tmp_path / "summary.json").read_text())
    test = summary["parts"]["test"]
    assert test["mean"]["finetuned"]["mAP"] == pytest.approx(0.7)
    assert test["margins"]["finetuned"]["0"]["recall@1"] == pytest.approx(0.1)  # over untrained
    assert test["margins"]["finetuned"]["1"]["recall@1"] == pytest.approx(-0.1)  # under tiny frames
    assert test["mean_margins"]["finetuned"]["uAP"] == pytest.approx(0.7 - 0.6)  # means compared
    assert summary["parts"]["dev"]["mean"]["finetuned"]["mAP"] == pytest.approx(0.35)
    markdown = (tmp_path / "summary.md").read_text()
    assert "## test part" in markdown and "| finetuned | 1 | -0.100 |" in markdown
    assert (tmp_path / "summary-test.png").stat().st_size > 0 and (tmp_path / "summary-dev.png").stat().st_size > 0


def test_event_path_callbacks_become_score_rows() -> None:
    """scripts/bench_events.py: a callback's results are its query's row, every clip not
    returned tied below them; a lost or errored event returns nothing."""
    from scripts.bench_events import callback_rows

    answers = {
        "a": {"error": None, "results": [{"video_id": 7, "calibrated": 0.9}, {"video_id": 5, "calibrated": 0.2}]},
        "b": {"error": "video 9: not a video", "results": []},
        "c": None,
        "d": {"error": None, "results": [{"video_id": 6, "calibrated": -0.5}, {"video_id": 99, "calibrated": 0.4}]},
    }
    positives = [2, 0, None, 0]  # "c" is a negative; "d"'s copy (video 5) was not returned
    matrix, counts = callback_rows(answers, ["a", "b", "c", "d"], [5, 6, 7], positives)
    assert counts == {"lost": 1, "errored": 1}
    floor, last = -1.5, -2.5  # below the lowest score returned (a video outside the library is ignored)
    expected = [[0.2, floor, 0.9], [last, floor, floor], [floor] * 3, [last, -0.5, floor]]
    np.testing.assert_array_equal(matrix, expected)
    metrics = evaluate(matrix, positives)
    assert metrics["recall@1"] == pytest.approx(1 / 3)  # a copy not returned is a miss, not a share of a tie
    assert metrics["mAP"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
