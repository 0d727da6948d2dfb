"""The retrieval benchmark (app.evaluate): metrics against hand-computed examples and a plain reference; the
generator and an end-to-end run on a tiny benchmark cut from real encoded videos."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from app.evaluate.generate import generate
from app.evaluate.ground_truth import GroundTruth
from app.evaluate.metrics import METRICS, evaluate, micro_average_precision
from app.evaluate.run import run
from app.evaluate.systems import phash_bits, phash_similarity, tiny_frames_descriptor
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


def test_ties_count_against_the_query() -> None:
    m = evaluate(np.ones((2, 6)), [3, None])
    assert m["recall@1"] == 0.0 and m["recall@5"] == 0.0
    assert m["mAP"] == pytest.approx(1 / 6)
    assert m["uAP"] == pytest.approx(1 / 12)  # the true pair sorted after all 11 false ones


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
    d = tiny_frames_descriptor(clips)
    assert d.shape == (3, 256)
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


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 6-s moving videos: 3 segments of 2 s each."""
    d = tmp_path_factory.mktemp("sources")
    for name, pattern in (("a", "testsrc2"), ("b", "mandelbrot"), ("c", "life=seed=7:mold=10")):
        make_video(d / f"{name}.mp4", seconds=6, width=160, height=120, pattern=pattern)
    return d


@pytest.fixture(scope="module")
def bench(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    return generate(
        sources, out, seed=3, segment_s=2.0, queries_per_video=2, negatives=3, edits=EDITS,
        show_progress=False,
    )  # fmt: skip


def test_generated_ground_truth_is_consistent(bench: Path) -> None:
    gt = GroundTruth.load(bench)
    ids = [c.id for c in gt.library]
    assert len(ids) == len(set(ids)) == 6  # 3 segments per source, one held out of each
    assert {c.source for c in gt.library} == {"a", "b", "c"}
    positives = [q for q in gt.queries if q.positive is not None]
    negatives = [q for q in gt.queries if q.positive is None]
    assert len(positives) == 6 and len(negatives) == 3
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

    # The insertion wraps the copy in another video: the query is longer than the copy.
    inserted = next(q for q in gt.queries if "insertion" in q.edits and "speed_up" not in q.edits)
    sample = sample_frames(inserted.path, fps=1.0, size=32)
    assert sample.info.duration_s > inserted.duration_s + 1.5


def test_generation_is_deterministic(sources: Path, bench: Path, tmp_path: Path) -> None:
    def answers(path: Path) -> list[tuple]:
        gt = GroundTruth.load(path)
        return [(q.id, q.edit, q.positive, q.start_s, q.duration_s) for q in gt.queries]

    args = {"segment_s": 2.0, "queries_per_video": 2, "negatives": 3, "edits": EDITS}
    again = generate(sources, tmp_path / "again", seed=3, show_progress=False, **args)
    assert answers(again) == answers(bench)
    other = generate(sources, tmp_path / "other", seed=4, show_progress=False, **args)
    assert answers(other) != answers(bench)
    # Unchanged sources and parameters: the benchmark is reused, not re-cut.
    mtime = again.stat().st_mtime_ns
    assert generate(sources, tmp_path / "again", seed=3, show_progress=False, **args) == again
    assert again.stat().st_mtime_ns == mtime


def test_run_reports_every_system(bench: Path, tmp_path: Path) -> None:
    from app.learn.encoder import EncoderConfig, initial_encoder, save_checkpoint

    # A stand-in "trained" checkpoint at 32x32 frames, so the whole run stays fast.
    config = EncoderConfig(frame_size=32, embed_dim=32, projector_hidden=32)
    ckpt = save_checkpoint(tmp_path / "enc.pt", initial_encoder(config, seed=1))
    report = run(bench, out_dir=tmp_path / "report", checkpoints={"trained": ckpt}, show_progress=False)
    assert list(report.metrics) == ["trained", "untrained", "tiny frames", "pHash"]
    for m in report.metrics.values():
        assert set(m) >= {"recall@1", "recall@5", "mAP", "uAP"}
        assert 0 <= m["recall@1"] <= m["recall@5"] <= 1
        assert 0 < m["uAP"] <= 1 and 0 < m["mAP"] <= 1
        assert (m["positives"], m["negatives"]) == (6, 3)
    assert set(report.margins()) == {"trained"}
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["metrics"]["pHash"] == pytest.approx(report.metrics["pHash"])
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| pHash |" in markdown and "margin over the best baseline" in markdown
    assert (tmp_path / "report" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_finetune_trains_on_library_clips_only(bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.learn.train.loop as train_module
    from app.evaluate.run import finetune_on_library
    from app.learn.encoder import EncoderConfig

    seen: list[Path] = []
    real_train = train_module.train

    def recording_train(config, videos, **kwargs):  # type: ignore[no-untyped-def]
        seen.extend(videos)
        return real_train(config, videos, **kwargs)

    monkeypatch.setattr(train_module, "train", recording_train)
    tiny = {
        "encoder": EncoderConfig(frame_size=32, embed_dim=32, projector_hidden=32),
        "frames": 2, "batch_size": 4, "num_workers": 0, "torch_threads": 1,
    }  # fmt: skip
    result = finetune_on_library(bench, tmp_path / "ft", steps=2, overrides=tiny)
    gt = GroundTruth.load(bench)
    assert sorted(seen) == sorted(c.path for c in gt.library)  # no query, ever
    assert result.steps == 2 and result.videos == len(gt.library)
    report = run(
        bench, out_dir=tmp_path / "report", checkpoints={"finetuned": result.checkpoint},
        baselines=["untrained"], show_progress=False,
    )  # fmt: skip
    assert list(report.metrics) == ["finetuned", "untrained"]


def test_summary_over_seeds_reports_means_and_per_seed_margins(tmp_path: Path) -> None:
    from rich.console import Console

    from scripts.bench_retrieval import _summarise

    def report(trained: float, untrained: float, tiny: float) -> dict:
        values = {"finetuned": trained, "untrained": untrained, "tiny frames": tiny}
        return {"metrics": {n: dict.fromkeys(METRICS, v) for n, v in values.items()},
                "baselines": ["untrained", "tiny frames"]}  # fmt: skip

    _summarise({0: report(0.8, 0.7, 0.5), 1: report(0.6, 0.4, 0.7)}, tmp_path, Console(file=io.StringIO()))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mean"]["finetuned"]["mAP"] == pytest.approx(0.7)
    assert summary["margins"]["finetuned"]["0"]["recall@1"] == pytest.approx(0.1)  # over untrained
    assert summary["margins"]["finetuned"]["1"]["recall@1"] == pytest.approx(-0.1)  # under tiny frames
    assert summary["mean_margins"]["finetuned"]["uAP"] == pytest.approx(0.7 - 0.6)  # means compared
    assert "| finetuned | 1 | -0.100 |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "summary.png").stat().st_size > 0
