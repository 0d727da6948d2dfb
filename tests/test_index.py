"""The index lifecycle and search (app/index/: files, build, search, rebuild): versions switched
atomically under concurrent searches, fresh additions and switches seen by another worker
process, corrupt versions refused, hash retrieval, shards, calibrated scores. Real
Postgres (conftest); index files in the test data directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update

from app.config import Settings
from app.index import queries, rebuild, search
from app.index.build import build_version, shard_of
from app.index.calibrate import calibrate, calibration_reference
from app.index.frames import unpack
from app.index.hits import exact_search
from app.index.params import IndexParams
from app.index.transform import normalise, quantise_i8
from app.index.version import MANIFEST, IndexFileError, IndexVersionFiles
from app.models import Embedding, IndexVersion, ModelVersion, Video


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    return normalise(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Clusters of 20 with a shared offset (like real embeddings: all cosines high)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 20), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return normalise(x + 1.5 * np.abs(rng.standard_normal(d)).astype(np.float32))


def _add_videos(session, model: ModelVersion, vectors: np.ndarray, *, tag: str, **fields) -> list[Video]:  # type: ignore[no-untyped-def]
    """A ready video (``fields``: more of its columns) and its embedding per vector."""
    run = uuid.uuid4().hex[:8]
    videos = [Video(uri=f"test://index/{tag}/{run}/{i}", status="ready", **fields) for i in range(len(vectors))]
    session.add_all(videos)
    session.flush()
    session.add_all(
        Embedding(video_id=v.id, model_version_id=model.id, vector=vec.astype(np.float32).tobytes(), dim=model.dim,
                  frames=1)
        for v, vec in zip(videos, vectors, strict=True)
    )  # fmt: skip
    session.flush()
    return videos


@pytest.fixture
def model(session) -> ModelVersion:  # type: ignore[no-untyped-def]
    from app.learn.registry import active_model

    m = active_model(session=session)
    session.commit()
    return m


# ----------------------------------------------------------------------------- files alone


def test_version_files_checked_before_they_are_read(tmp_path: Path) -> None:
    vectors, keys = _unit(300, 64), np.arange(5000, 5300)
    params = IndexParams(mode="hash", hash_rotation="pca", rerank=50)
    built = build_version(keys=keys, vectors=vectors, directory=tmp_path / "v1", params=params)
    assert built.params["mode"] == "hash" and built.dtype == "b1"
    assert not list(tmp_path.glob("*.tmp")), "the temporary directory is renamed, not left behind"
    opened = IndexVersionFiles.view(built.path, sha256=built.sha256, dim=64)
    assert opened.search(vectors[7], 1)[0].key == 5007

    with pytest.raises(IndexFileError, match="holds 64-d"):  # foreign: another model's dimension
        IndexVersionFiles.view(built.path, sha256=built.sha256, dim=128)
    with pytest.raises(IndexFileError, match=r"manifest .* is corrupt"):
        IndexVersionFiles.view(built.path, sha256="0" * 64, dim=64)
    for name in ("shard-0.usearch", "vectors-0.npy", "keys-0.npy", "background.npy"):
        target = built.path.parent / name
        original = target.read_bytes()
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0xFF
        target.write_bytes(bytes(damaged))
        with pytest.raises(IndexFileError, match=f"{name} is corrupt"):
            IndexVersionFiles.view(built.path, sha256=built.sha256, dim=64)
        target.write_bytes(original)
    (built.path.parent / "keys-0.npy").unlink()
    with pytest.raises(IndexFileError, match="missing"):
        IndexVersionFiles.view(built.path, sha256=built.sha256, dim=64)
    with pytest.raises(FileExistsError):  # a version directory is never written over
        build_version(keys=keys, vectors=vectors, directory=tmp_path / "v1", params=params)


def test_a_version_keeps_the_frames_it_was_given_and_refuses_a_damaged_copy(tmp_path: Path) -> None:
    """The second stage's copy of the library's frames: what ``frames_of`` returned for
    each video (any length, float16 as stored, its times), nothing for a video without
    frames or outside the version; read in more than one batch; checksummed."""
    from app.index import build
    from app.index.frames import Frames

    rng = np.random.default_rng(5)
    keys = np.arange(900, 900 + 2 * build._FRAME_READ + 3)[::-1]  # not in order: stored ascending
    stored = {}
    for k in keys[keys % 5 > 0].tolist():  # every fifth video has no frames
        length = int(rng.integers(1, 9))
        vectors = rng.standard_normal((length, 16)).astype(np.float16).astype(np.float32)
        stored[k] = Frames(vectors, np.sort(rng.uniform(0, 60, length)).astype(np.float32).astype(np.float64))
    batches = []

    def frames_of(ids: np.ndarray) -> dict[int, Frames]:
        batches.append(len(ids))
        return {int(i): stored[int(i)] for i in ids if int(i) in stored}

    built = build_version(keys=keys, vectors=_unit(len(keys), 8), directory=tmp_path / "v", frames_of=frames_of)
    assert len(batches) == 3 and sum(batches) == len(keys)
    opened = IndexVersionFiles.view(built.path, sha256=built.sha256, dim=8)
    assert opened.has_frames
    asked = [int(k) for k in keys[:40]] + [5]  # 5: not in the version
    read = opened.frames_of(asked)
    assert set(read) == {k for k in asked if k in stored}
    for k, frames in read.items():
        np.testing.assert_array_equal(frames.vectors, stored[k].vectors)
        np.testing.assert_array_equal(frames.times, stored[k].times)
    plain = build_version(keys=keys, vectors=_unit(len(keys), 8), directory=tmp_path / "plain")
    without = IndexVersionFiles.view(plain.path, sha256=plain.sha256, dim=8)
    assert not without.has_frames and without.frames_of(asked) == {}

    target = built.path.parent / "frames.f16"
    damaged = bytearray(target.read_bytes())
    damaged[len(damaged) // 3] ^= 0xFF
    target.write_bytes(bytes(damaged))
    with pytest.raises(IndexFileError, match=r"frames\.f16 is corrupt"):
        IndexVersionFiles.view(built.path, sha256=built.sha256, dim=8)


def test_hash_mode_top1_equals_exact_on_clear_duplicates(tmp_path: Path) -> None:
    """Binary codes (ITQ) by Hamming distance, then exact re-ranking: a lightly edited copy
    of a library video finds that video first, as exact search does."""
    library = _clustered(3000, 256, seed=1)
    keys = np.arange(3000) * 7 + 11
    built = build_version(keys=keys, vectors=library, directory=tmp_path / "hash",
                          params=IndexParams(mode="hash", hash_rotation="itq", rerank=100, exact_below=0))  # fmt: skip
    opened = IndexVersionFiles.view(built.path, sha256=built.sha256, dim=256)
    rng = np.random.default_rng(2)
    rows = rng.choice(3000, 200, replace=False)
    queries = normalise(library[rows] + 0.005 * rng.standard_normal((200, 256)).astype(np.float32))  # cosine ~0.997
    for row, q in zip(rows, queries, strict=True):
        exact = exact_search(keys, library, q, 1)[0]
        hit = opened.search(q, 1)[0]
        assert hit.key == exact.key == keys[row]
        assert hit.score == pytest.approx(exact.score, abs=2e-3)  # a cosine (f16 copy), not a Hamming distance
    batch_keys, _ = opened.search_batch(queries, 1)
    assert (batch_keys[:, 0] == keys[rows]).all()
    graph = (built.path.parent / "shard-0.usearch").stat().st_size
    assert graph / 3000 < 600  # 256-bit codes + links: what must stay in memory per video

    # Re-ranked with the caller's stored vectors instead of a copy: exact float32 cosines.
    params = IndexParams(mode="hash", hash_rotation="itq", rerank=100, rerank_from="database", exact_below=0)
    built = build_version(keys=keys, vectors=library, directory=tmp_path / "hash-db", params=params)
    assert not list(built.path.parent.glob("vectors-*"))
    opened = IndexVersionFiles.view(built.path, sha256=built.sha256, dim=256)
    row_of = {int(key): i for i, key in enumerate(keys)}
    reads: list[int] = []

    def vectors_of(ids: np.ndarray) -> np.ndarray:
        reads.append(len(ids))
        return np.stack([library[row_of[int(i)]] if int(i) in row_of else np.full(256, np.nan) for i in ids])

    with pytest.raises(ValueError, match="vectors_of"):
        opened.search(queries[0], 1)
    for row, q in zip(rows[:50], queries[:50], strict=True):
        hit = opened.search(q, 1, vectors_of=vectors_of)[0]
        assert hit.key == keys[row] and hit.score == pytest.approx(float(library[row] @ q), abs=1e-5)
    assert reads == [100] * 50  # one read of the candidates per search
    batch_keys, batch_scores = opened.search_batch(queries, 1, vectors_of=vectors_of)
    assert (batch_keys[:, 0] == keys[rows]).all() and len(reads) == 51
    assert batch_scores[:, 0] == pytest.approx((library[rows] * queries).sum(axis=1), abs=1e-5)
    del row_of[int(keys[rows[0]])]  # deleted from the store since the build: never returned
    assert opened.search(queries[0], 1, vectors_of=vectors_of)[0].key != keys[rows[0]]


def test_shard_merge_equals_unsharded_results(tmp_path: Path) -> None:
    library, keys = _clustered(2000, 64, seed=3), np.arange(100_000, 102_000)
    queries = _unit(50, 64, seed=4) * 0.3 + library[:50]
    versions = {}
    for shards in (1, 4):
        params = IndexParams(dtype="f32", shards=shards)
        built = build_version(keys=keys, vectors=library, directory=tmp_path / f"s{shards}", params=params)
        versions[shards] = IndexVersionFiles.view(built.path, sha256=built.sha256, dim=64)
    counts = np.bincount(shard_of(keys, 4), minlength=4)
    assert (counts > 300).all(), f"keys spread over the shards by hash: {counts}"
    for q in queries:
        one, four = versions[1].search(q, 10, exact=True), versions[4].search(q, 10, exact=True)
        assert (
            [h.key for h in one]
            == [h.key for h in four]
            == [h.key for h in exact_search(keys, library, normalise(q), 10)]
        )
        np.testing.assert_allclose([h.score for h in one], [h.score for h in four], atol=1e-6)
    batch_keys, _ = versions[4].search_batch(queries, 5)
    for q, row in zip(queries[:5], batch_keys[:5], strict=True):
        assert row.tolist() == [h.key for h in versions[4].search(q, 5)]


def test_i8_pca_and_params() -> None:
    x = _unit(10, 32)
    q = quantise_i8(x)
    assert q.dtype == np.int8 and np.abs(q).max(axis=1).tolist() == [127] * 10
    assert np.allclose(normalise(q.astype(np.float32)) @ x[0], x @ x[0], atol=0.02)
    with pytest.raises(ValueError, match="rerank"):
        IndexParams(mode="hash", rerank=0)
    with pytest.raises(ValueError, match="rerank"):
        IndexParams(pca_dim=16)
    params = IndexParams(pca_dim=16, pca_whiten=True, rerank=20)
    assert IndexParams.from_dict({**params.to_dict(), "format": "x"}) == params


def test_pca_reduced_version_reranks_to_exact_cosines(tmp_path: Path) -> None:
    library, keys = _clustered(1500, 128, seed=5), np.arange(1500)
    params = IndexParams(pca_dim=32, pca_whiten=True, rerank=50, dtype="i8")
    built = build_version(keys=keys, vectors=library, directory=tmp_path / "pca", params=params)
    opened = IndexVersionFiles.view(built.path, sha256=built.sha256, dim=128)
    assert opened.manifest["coarse_dim"] == 32
    for row in (0, 99, 1499):
        hits = opened.search(library[row], 3)
        assert hits[0].key == row and hits[0].score == pytest.approx(1.0, abs=2e-3)


# ----------------------------------------------------------------------------- with Postgres


def test_rebuild_records_params_and_never_overlaps(session, settings, model) -> None:  # type: ignore[no-untyped-def]
    from app.db import session_scope

    _add_videos(session, model, _unit(20, model.dim, seed=6), tag="params")
    session.commit()
    version = rebuild.rebuild_index(session=session, model=model, settings=settings, dtype="i8")
    assert version.dtype == "i8"
    assert version.params["format"] == "vidsim-index/2"
    assert version.params["connectivity"] == settings.index_connectivity and version.params["bytes"] > 0
    assert version.params["self_recall"] > 0.5  # the build's own check of its graph
    assert Path(version.path).name == MANIFEST and Path(version.path).is_file()
    with session_scope() as other, pytest.raises(rebuild.RebuildBusy):
        rebuild.rebuild_index(session=other, model=model, settings=settings)  # the first holds the lock until commit
    session.commit()


def test_periodic_refresh_folds_in_new_embeddings_and_skips_when_busy(session, settings, model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app.db import session_scope
    from workers.tasks import refresh_index

    _add_videos(session, model, _unit(6, model.dim, seed=16), tag="refresh-a")
    session.commit()
    built = rebuild.rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    assert rebuild.refresh_index(session=session, model=model, settings=settings) is None  # nothing new
    fresh_vectors = _unit(3, model.dim, seed=17)
    fresh = _add_videos(session, model, fresh_vectors, tag="refresh-b")
    session.commit()
    few = settings.model_copy(update={"index_rebuild_min_new": 4})
    # 3 < 4: searched exactly meanwhile
    assert rebuild.refresh_index(session=session, model=model, settings=few) is None
    assert queries.embeddings_since_index(session=session, model=model) == (built, 3)

    monkeypatch.setattr("workers.tasks.get_settings", lambda: settings.model_copy(update={"index_rebuild_min_new": 1}))
    with session_scope() as holder:
        rebuild.rebuild_index(session=holder, model=model, settings=settings)  # holds the rebuild lock until commit
        assert refresh_index.apply().get() is None  # the beat task skips instead of failing
    newest, newer = queries.embeddings_since_index(session=session, model=model)
    assert newest.id != built.id and newer == 0
    for video, vector in zip(fresh, fresh_vectors, strict=True):
        matches, used = search.search_library(
            session=session, model=model, query=vector, k=1, exclude=set(), settings=settings
        )
        assert matches[0].video_id == video.id and used == newest.id  # from the new file, not the delta


def test_atomic_switch_under_concurrent_searches(session, settings, model) -> None:  # type: ignore[no-untyped-def]
    """Threads search while the index is rebuilt and switched many times: no error, never
    an empty result, the right top-1 throughout, every version seen whole."""
    from app.db import session_scope

    vectors = _clustered(300, model.dim, seed=7)
    videos = _add_videos(session, model, vectors, tag="switch")
    session.commit()
    keep_all = settings.model_copy(update={"index_keep_versions": 100})
    rebuild.rebuild_index(session=session, model=model, settings=keep_all)
    session.commit()
    stop = threading.Event()
    errors: list[str] = []
    used: set[int | None] = set()
    searches = [0]

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            i = int(rng.integers(0, len(videos)))
            try:
                with session_scope() as s:
                    m = s.get_one(ModelVersion, model.id)
                    matches, version = search.search_library(session=s, model=m, query=vectors[i], k=5, exclude=set())
                if not matches or matches[0].video_id != videos[i].id:
                    errors.append(f"query {i}: {[(x.video_id, round(x.score, 4)) for x in matches]}")
                used.add(version)
                searches[0] += 1
            except Exception as exc:  # the test reports every failure
                errors.append(repr(exc))

    def watcher() -> None:
        # A version directory is visible only when whole: its manifest is there.
        while not stop.is_set():
            for d in settings.index_dir.iterdir():
                whole = not d.is_dir() or d.name.endswith(".tmp") or (d / MANIFEST).exists()
                if not whole and d.exists():  # (not removed meanwhile by the clean-up)
                    errors.append(f"partial version directory {d}")
            time.sleep(0.005)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)] + [threading.Thread(target=watcher)]
    for t in threads:
        t.start()
    try:
        for i in range(6):
            rerank_from = "database" if i == 3 else "file"
            mode = (
                {"mode": "hash", "hash_rotation": "none", "rerank": 50, "rerank_from": rerank_from}
                if i % 2
                else {"dtype": "f16"}
            )
            rebuild.rebuild_index(session=session, model=model, settings=keep_all, params=IndexParams(**mode))
            session.commit()
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:5]
    assert searches[0] > 20 and len(used - {None}) >= 3, (searches, used)
    assert not search._refused


def test_fresh_addition_and_switch_seen_by_another_worker_process(session, settings, model) -> None:  # type: ignore[no-untyped-def]
    """Another process serving searches finds a video embedded after the index was built
    (no rebuild), then picks up a rebuild without restarting."""
    vectors = _clustered(60, model.dim, seed=8)
    videos = _add_videos(session, model, vectors[:50], tag="fresh")
    session.commit()
    first = rebuild.rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    code = (
        "import json, sys, numpy as np\n"
        "from app.db import session_scope\nfrom app.models import ModelVersion\n"
        "from app.index.search import search_library\n"
        "for line in sys.stdin:\n"
        "    with session_scope() as s:\n"
        f"        m = s.get_one(ModelVersion, {model.id})\n"
        "        query = np.array(json.loads(line), dtype=np.float32)\n"
        "        matches, used = search_library(session=s, model=m, query=query, k=3, exclude=set())\n"
        "    print(json.dumps({'ids': [x.video_id for x in matches], 'used': used}), flush=True)\n"
    )  # fmt: skip
    env = {**os.environ, "VIDSIM_INDEX_REFRESH_S": "0.5"}
    worker = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env, cwd=Path(__file__).parent.parent)  # fmt: skip

    def ask(vector: np.ndarray) -> dict:  # type: ignore[type-arg]
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(json.dumps(vector.tolist()) + "\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())

    try:
        answer = ask(vectors[3])  # the worker opens the index and caches the delta
        assert answer["used"] == first.id and answer["ids"][0] == videos[3].id
        fresh = _add_videos(session, model, vectors[50:], tag="fresh-late")
        session.commit()
        answer = ask(vectors[55])
        assert answer["ids"][0] == fresh[5].id and answer["used"] == first.id  # found exactly, no rebuild
        second = rebuild.rebuild_index(session=session, model=model, settings=settings)
        session.commit()
        time.sleep(0.6)  # the worker re-reads the active version every 0.5 s here
        answer = ask(vectors[55])
        assert answer["used"] == second.id and answer["ids"][0] == fresh[5].id
    finally:
        for pipe in (worker.stdin, worker.stdout):
            if pipe is not None:
                pipe.close()
        worker.wait(timeout=30)


def test_corrupt_version_refused_and_previous_keeps_serving(session, settings, model) -> None:  # type: ignore[no-untyped-def]
    vectors = _clustered(40, model.dim, seed=9)
    videos = _add_videos(session, model, vectors, tag="corrupt")
    session.commit()
    good = rebuild.rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    _, used = search.search_library(session=session, model=model, query=vectors[1], k=3, exclude=set())
    assert used == good.id
    bad = rebuild.rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    shard = Path(bad.path).parent / "shard-0.usearch"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    for _ in range(2):  # refused once, remembered: not re-checked on every search
        matches, used = search.search_library(session=session, model=model, query=vectors[1], k=3, exclude=set())
        assert used == good.id and matches[0].video_id == videos[1].id
    assert bad.id in search._refused
    # A worker started now has nothing open to keep serving: it falls back to the newest
    # older version that passes its checks.
    code = (
        "import sys, numpy as np\nfrom app.db import session_scope\nfrom app.models import ModelVersion\n"
        "from app.index.search import search_library\nwith session_scope() as s:\n"
        f"    m = s.get_one(ModelVersion, {model.id})\n"
        "    query = np.frombuffer(sys.stdin.buffer.read(), np.float32)\n"
        "    matches, used = search_library(session=s, model=m, query=query, k=1, exclude=set())\n"
        "print(matches[0].video_id, used)\n"
    )  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], input=vectors[1].astype(np.float32).tobytes(),
                         capture_output=True, check=True, cwd=Path(__file__).parent.parent).stdout  # fmt: skip
    assert out.decode().split() == [str(videos[1].id), str(good.id)]


def test_calibrated_scores_flag_near_duplicates_and_disabled_videos_are_excluded(session, settings, model) -> None:  # type: ignore[no-untyped-def]
    library = _unit(300, model.dim, seed=11)
    query = library[0]
    near_copy = normalise(query + 0.05 * _unit(1, model.dim, seed=12)[0])  # cosine ~0.999
    related = normalise(query + 1.0 * _unit(1, model.dim, seed=13)[0])  # cosine ~0.7
    videos = _add_videos(session, model, np.vstack([library, near_copy, related]), tag="calibrated")
    session.commit()
    rebuild.rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    query_video, copy_video, related_video = videos[0], videos[300], videos[301]

    matches, _ = search.search_library(session=session, model=model, query=query, k=3, exclude={query_video.id})
    by_id = {m.video_id: m for m in matches}
    assert [m.video_id for m in matches[:2]] == [copy_video.id, related_video.id]
    assert by_id[copy_video.id].near_duplicate and by_id[copy_video.id].calibrated > 0.95
    assert not by_id[related_video.id].near_duplicate and 0 < by_id[related_video.id].calibrated < 0.85
    assert by_id[copy_video.id].cosine == pytest.approx(float(near_copy @ query), abs=2e-3)
    # Scores are comparable across queries: the reference is the query's own background.
    reference = calibration_reference(query, library)
    assert calibrate(1.0, reference) == pytest.approx(1.0) and calibrate(reference, reference) == 0

    matches, _ = search.search_library(session=session, model=model, query=query, k=3, exclude={query_video.id},
                                       exclude_near_duplicates=True)  # fmt: skip
    assert matches[0].video_id == related_video.id and not any(m.near_duplicate for m in matches)

    related_video.enabled = False  # in the index file, but disabled since
    session.commit()
    matches, _ = search.search_library(session=session, model=model, query=query, k=5, exclude={query_video.id})
    assert related_video.id not in {m.video_id for m in matches} and len(matches) == 5


def test_hash_mode_reranks_with_the_stored_embeddings(session, settings, model) -> None:  # type: ignore[no-untyped-def]
    """The default hash version keeps no float copy: each search re-ranks its candidates
    with the float32 embeddings read from Postgres, so scores are the exact cosines and a
    video deleted since the build is never returned."""
    vectors = _clustered(400, model.dim, seed=21)
    videos = _add_videos(session, model, vectors, tag="hash-db")
    session.commit()
    hashed = settings.model_copy(update={"index_mode": "hash"})
    version = rebuild.rebuild_index(session=session, model=model, settings=hashed)
    session.commit()
    assert version.params["rerank_from"] == "database" and version.params["rerank"] == 100
    assert not list(Path(version.path).parent.glob("vectors-*"))
    unit = {v.id: u for v, u in zip(videos, normalise(vectors), strict=True)}
    for i in range(0, 400, 40):
        matches, used = search.search_library(
            session=session, model=model, query=vectors[i], k=3, exclude=set(), settings=hashed
        )
        assert used == version.id and matches[0].video_id == videos[i].id
        for m in matches:  # float32 cosines (an f16 copy is ~1e-3 off)
            if m.video_id in unit:
                assert m.cosine == pytest.approx(float(unit[m.video_id] @ unit[videos[i].id]), abs=1e-5)
    session.delete(videos[40])  # its embedding goes with it
    session.commit()
    matches, _ = search.search_library(
        session=session, model=model, query=vectors[40], k=3, exclude=set(), settings=hashed
    )
    assert videos[40].id not in {m.video_id for m in matches} and len(matches) == 3


def test_stored_vectors_read_in_order_on_sqlite_too(tmp_path: Path) -> None:
    """The embedded mode's database (SQLite) answers the same re-ranking read."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.models import Base

    engine = create_engine(f"sqlite:///{tmp_path / 'embedded.db'}")
    Base.metadata.create_all(engine)
    vectors = _unit(5, 8, seed=22)
    with Session(engine) as s:
        model = ModelVersion(name="m", dim=8)
        s.add(model)
        s.flush()
        _add_videos(s, model, vectors, tag="sqlite")
        s.commit()
        ids = [v for (v,) in s.execute(select(Video.id).order_by(Video.id))]
        got = queries.stored_vectors(session=s, model_id=model.id, dim=8, video_ids=np.array([ids[3], 999_999, ids[0]]))
    assert np.array_equal(got[[0, 2]], vectors[[3, 0]]) and np.isnan(got[1]).all()
    engine.dispose()


def test_index_versions_beyond_the_kept_ones_are_deleted(session, settings, model) -> None:  # type: ignore[no-untyped-def]
    _add_videos(session, model, _unit(10, model.dim, seed=14), tag="cleanup")
    session.commit()
    keep_two = settings.model_copy(update={"index_keep_versions": 2})
    made = []
    for _ in range(3):
        made.append(rebuild.rebuild_index(session=session, model=model, settings=keep_two))
        session.commit()
    assert Path(made[-1].path).exists() and Path(made[-2].path).exists()
    assert not Path(made[0].path).parent.exists()
    assert session.scalar(select(IndexVersion).where(IndexVersion.id == made[0].id)) is not None  # history kept


def test_model_keeps_its_newest_version_when_another_models_index_is_activated(session, settings, model) -> None:  # type: ignore[no-untyped-def]
    """One index is active across models (schema): activating a warming model's index
    must not send the serving model to an exact scan of every embedding."""
    from sqlalchemy import update

    vectors = _unit(5, model.dim, seed=15)
    videos = _add_videos(session, model, vectors, tag="warming")
    session.commit()
    version = rebuild.rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    session.execute(update(IndexVersion).values(is_active=False))  # as if another model's index took over
    session.commit()
    search.invalidate_cache()
    matches, used = search.search_library(session=session, model=model, query=vectors[2], k=1, exclude=set())
    assert used == version.id and matches[0].video_id == videos[2].id
    session.execute(update(IndexVersion).where(IndexVersion.id == version.id).values(is_active=True))
    session.commit()


def test_embeddings_committed_out_of_id_order_are_found_at_once_and_after_a_rebuild(session, settings, model) -> None:  # type: ignore[no-untyped-def]
    """Embedding ids come from a sequence at insert, not at commit: a transaction that took
    the lower id and commits after another one's higher id (and after a search and a
    rebuild saw that one) still has its vector found at once, and in the next build."""
    from app.db import session_scope

    _add_videos(session, model, _clustered(50, model.dim, seed=30), tag="order-base")
    session.commit()
    rebuild.rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    slow_vector, quick_vector = _unit(2, model.dim, seed=31)
    with session_scope() as slow:  # the first to insert, the last to commit
        [slow_video] = _add_videos(slow, model, slow_vector[None], tag="order-slow")
        with session_scope() as quick:
            [quick_video] = _add_videos(quick, model, quick_vector[None], tag="order-quick")
        matches, _ = search.search_library(session=session, model=model, query=quick_vector, k=1, exclude=set())
        assert matches[0].video_id == quick_video.id  # the delta has read past the slow one's id
        built = rebuild.rebuild_index(session=session, model=model, settings=settings)
        session.commit()
    ids = dict(session.execute(select(Embedding.video_id, Embedding.id).where(
        Embedding.video_id.in_([slow_video.id, quick_video.id]))).all())  # fmt: skip
    assert ids[slow_video.id] < ids[quick_video.id]
    for video, vector in ((slow_video, slow_vector), (quick_video, quick_vector)):
        matches, used = search.search_library(session=session, model=model, query=vector, k=1, exclude=set())
        assert (matches[0].video_id, used) == (video.id, built.id)
    again = rebuild.rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    assert again.size == built.size + 1  # the slow one is in the file now
    assert queries.embeddings_since_index(session=session, model=model) == (again, 0)
    for video, vector in ((slow_video, slow_vector), (quick_video, quick_vector)):
        matches, used = search.search_library(session=session, model=model, query=vector, k=1, exclude=set())
        assert (matches[0].video_id, used) == (video.id, again.id)


def test_query_only_videos_stay_out_of_the_index_and_one_added_to_the_library_is_found_at_once(
    session, settings, model
) -> None:  # type: ignore[no-untyped-def]
    """Videos seen only in events (query-only) are never in the index, the delta or the
    calibration background: 200 edited copies of one clip change neither the index size
    nor a warm query's results and scores. One added to the library later is found at
    once (no rebuild), and is in the next build."""
    from app.media.register import register

    library = _clustered(200, model.dim, seed=32)
    _add_videos(session, model, library, tag="library")
    session.commit()
    built = rebuild.rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    query = normalise(library[0] + 0.3 * _unit(1, model.dim, seed=33)[0])

    def warm() -> list[tuple[int, float]]:
        matches, _ = search.search_library(session=session, model=model, query=query, k=10, exclude=set())
        return [(m.video_id, round(m.calibrated or 0.0, 4)) for m in matches]

    before = warm()
    cold = _add_videos(session, model, normalise(query + 0.05 * _unit(200, model.dim, seed=34)), tag="cold",
                       in_library=False)  # fmt: skip
    session.commit()
    assert warm() == before
    assert queries.embeddings_since_index(session=session, model=model) == (built, 0)
    again = rebuild.rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    assert again.size == built.size
    assert warm() == before

    register(session, cold[7].uri, settings=settings)  # now a library video too
    session.commit()
    matches, used = search.search_library(session=session, model=model, query=query, k=1, exclude=set())
    assert (matches[0].video_id, used) == (cold[7].id, again.id)
    assert queries.embeddings_since_index(session=session, model=model) == (again, 1)
    third = rebuild.rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    assert third.size == built.size + 1


@pytest.mark.parametrize("exact_up_to", [None, 0], ids=["searched-exactly", "index-then-exact"])
def test_small_collection_returns_all_its_videos_and_never_another(
    session, settings, model, monkeypatch, exact_up_to
) -> None:  # type: ignore[no-untyped-def]
    """A collection of 3 asked for k=5 returns exactly its 3 videos, however far they are
    from the query in a large library: small collections are searched exactly (and a
    larger one whose videos the widened index search misses falls back to it)."""
    if exact_up_to is not None:
        monkeypatch.setattr(search, "EXACT_COLLECTION", exact_up_to)
    library = _clustered(1000, model.dim, seed=35)
    _add_videos(session, model, library, tag="big")
    query = library[0]
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    far = normalise(-query + 0.3 * _unit(5, model.dim, seed=36))  # the least similar of all
    members = _add_videos(session, model, far[:3], tag="tiny", collection=name)
    _add_videos(session, model, far[3:4], tag="tiny-off", collection=name, enabled=False)
    _add_videos(session, model, far[4:5], tag="tiny-cold", collection=name, in_library=False)
    session.commit()
    version = rebuild.rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    matches, used = search.search_library(session=session, model=model, query=query, k=5, exclude=set(),
                                          collection=name)  # fmt: skip
    assert sorted(m.video_id for m in matches) == sorted(v.id for v in members) and used == version.id
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
    matches, _ = search.search_library(session=session, model=model, query=query, k=2, exclude={members[0].id},
                                       collection=name)  # fmt: skip
    assert sorted(m.video_id for m in matches) == sorted(v.id for v in members[1:])


_EMBEDDED = """
import numpy as np
from sqlalchemy.orm import Session
from app.config import get_settings
from app.db import downgrade, get_engine, migrate
from app.config import Settings
from app.index import queries, rebuild, search
from app.media.register import register
from app.models import Embedding, ModelVersion, Video

for step, revision in ((migrate, "head"), (downgrade, "0003_embedding_storage"), (migrate, "head")):
    step(revision)
settings = get_settings()
vectors = np.random.default_rng(40).standard_normal((5, 8)).astype(np.float32)

def add(session, model, i, **fields):
    video = Video(uri=f"test://embedded/{i}", status="ready", **fields)
    session.add(video)
    session.flush()
    session.add(Embedding(video_id=video.id, model_version_id=model.id, vector=vectors[i].tobytes(), dim=8, frames=1))
    session.flush()
    return video

def top(session, model, i):
    matches, used = search.search_library(session=session, model=model, query=vectors[i], k=1, exclude=set(),
                                          settings=settings)
    return matches[0].video_id, used

with Session(get_engine()) as s:
    model = ModelVersion(name="m", dim=8)
    s.add(model)
    s.flush()
    library = [add(s, model, i) for i in range(3)]
    s.commit()
    built = rebuild.rebuild_index(session=s, model=model, settings=settings)
    s.commit()
    assert built.size == 3 and top(s, model, 1) == (library[1].id, built.id)
    fresh, cold = add(s, model, 3), add(s, model, 4, in_library=False)
    s.commit()
    assert top(s, model, 3) == (fresh.id, built.id) and top(s, model, 4)[0] != cold.id
    assert queries.embeddings_since_index(session=s, model=model) == (built, 1)
    register(s, cold.uri, settings=settings)
    s.commit()
    assert top(s, model, 4) == (cold.id, built.id)
    again = rebuild.rebuild_index(session=s, model=model, settings=settings)
    s.commit()
    assert again.size == 5 and queries.embeddings_since_index(session=s, model=model) == (again, 0)
print("ok")
"""


def test_embedded_sqlite_finds_fresh_and_newly_listed_videos(tmp_path: Path) -> None:
    """The embedded mode (SQLite: one writer at a time) stamps writes by count: a fresh
    embedding and a query-only video added to the library are found at once, and a
    query-only one never; its migrations go down and up again."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(VIDSIM_DATA_DIR=str(tmp_path), VIDSIM_MEDIA_ROOTS=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _EMBEDDED], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_bench_exact_reference_spreads_its_batch_over_threads() -> None:
    """`vidsim bench index` gives the exact reference's batch the threads USearch's batch
    gets: the same answer on any number of them, every block of queries filled."""
    from scripts.bench_index import exact_topk

    library, queries_ = _unit(500, 32, seed=50), _unit(37, 32, seed=51)
    one = exact_topk(library, queries_, 5, threads=1)
    for threads in (3, 64):
        rows, scores = exact_topk(library, queries_, 5, threads=threads)
        assert np.array_equal(rows, one[0]) and np.allclose(scores, one[1])
    assert np.array_equal(one[0][:, 0], [exact_search(np.arange(500), library, q, 1)[0].key for q in queries_])


# Frame descriptors as an encoder without thumbnails stores them, and with a 4 x 4
# thumbnail in mirror components after a 12-d head (matched under mirror images).
@pytest.mark.parametrize(
    "encoder_config", [{}, {"frame_dim": 12, "frame_thumbnail": 2, "frame_thumbnail_mirrors": True}],
    ids=["plain", "mirror-components"],
)  # fmt: skip
def test_second_stage_serves_what_the_benchmark_scores(session, settings, encoder_config) -> None:  # type: ignore[no-untyped-def]
    """The benchmark scores the served path: for the same library, search_library (first
    stage, frame re-rank from the stored descriptors, fusion) ranks and scores as
    app.evaluate.served.second_stage does on the benchmark's matrices, frames matched
    under mirror images where the model's descriptors have mirror components."""
    from app.evaluate.served import SecondStage, second_stage, served_scores
    from app.index.mirrors import Mirrors
    from app.serve import queries as serve_queries

    rng = np.random.default_rng(41)
    dim, frame_dim, n = 32, 16, 40
    # A model of its own: its embeddings are only this test's, searched exactly.
    model = ModelVersion(name=f"second-stage-{uuid.uuid4().hex[:8]}", config=encoder_config, checkpoint_path=None,
                         dim=dim, trained=False, data_summary={})  # fmt: skip
    session.add(model)
    session.flush()
    library = _unit(n, dim, seed=42)
    frames = [normalise(rng.normal(size=(int(rng.integers(3, 9)), frame_dim))).astype(np.float16).astype(np.float32)
              for _ in range(n)]  # fmt: skip
    picks = rng.choice(n, 6, replace=False)
    queries_v = normalise(library[picks] + 0.4 * _unit(6, dim, seed=43))
    queries_f = [normalise(frames[j][::-1] + 0.3 * rng.normal(size=frames[j].shape)).astype(np.float16)
                 .astype(np.float32) for j in picks]  # fmt: skip
    videos = [Video(uri=f"test://second-stage/{model.id}/{i}", status="ready") for i in range(n)]
    query_videos = [Video(uri=f"test://second-stage/{model.id}/q{i}", status="ready", in_library=False)
                    for i in range(6)]  # fmt: skip
    session.add_all(videos + query_videos)
    session.flush()
    for video, vector, f in [*zip(videos, library, frames, strict=True),
                             *zip(query_videos, queries_v, queries_f, strict=True)]:  # fmt: skip
        serve_queries.add_embedding(video.id, model.id, vector, frames=len(f), session=session, frame_vectors=f,
                                    frame_times=np.arange(len(f), dtype=np.float32))  # fmt: skip
    session.commit()

    first = served_scores(queries_v, library, params=IndexParams(dtype="f32"))
    mirrors = Mirrors.of(encoder_config)
    assert (mirrors is None) == (not encoder_config)
    expected = second_stage(first, queries_f, frames, stage=SecondStage(settings.rerank_candidates), mirrors=mirrors)
    column = {v.id: j for j, v in enumerate(videos)}

    def searched_as_on_the_benchmark(config: Settings) -> None:
        for i, query_video in enumerate(query_videos):
            emb = serve_queries.find_embedding(query_video.id, model.id, session=session)
            assert emb is not None and emb.frame_vectors is not None
            matches, _ = search.search_library(
                session=session, model=model, query=queries_v[i], k=10, exclude={query_video.id},
                query_frames=unpack(emb.frame_vectors, emb.frame_times, frame_dim), settings=config,
            )  # fmt: skip
            served = [column[m.video_id] for m in matches]
            assert served == list(np.argsort(-expected[i], kind="stable")[:10]), i
            np.testing.assert_allclose([m.calibrated for m in matches], expected[i][served], atol=1e-4)
            assert all(m.match is not None and m.span is not None for m in matches[:1])

    # Read from Postgres, then (the same searches again) from the process's frame cache.
    uncached = settings.model_copy(update={"rerank_frame_cache_mb": 0})
    for config in (uncached, settings, settings):
        searched_as_on_the_benchmark(config)
    assert {(model.id, v.id) for v in videos} <= set(search._frame_cache)

    # Through an index version of the library: the candidates' frames come from its copy,
    # the same as Postgres held when it was built (then gone from Postgres, the worker's
    # cache off; the background frames are read once per version, by the first search).
    rebuild.rebuild_index(session=session, model=model, settings=settings, dtype="f32")
    session.commit()
    searched_as_on_the_benchmark(uncached)
    library_ids = [v.id for v in videos]
    gone = update(Embedding).where(Embedding.model_version_id == model.id, Embedding.video_id.in_(library_ids))
    session.execute(gone.values(frame_vectors=None))
    session.commit()
    searched_as_on_the_benchmark(uncached)


def test_frame_cache_keeps_the_most_recent_within_its_bound(session) -> None:  # type: ignore[no-untyped-def]
    """Candidates' frames read once stay in the process, least recently used out first,
    never more than the bound."""
    from app.serve import queries as serve_queries

    model = ModelVersion(name=f"frame-cache-{uuid.uuid4().hex[:8]}", config={}, checkpoint_path=None, dim=8,
                         trained=False, data_summary={})  # fmt: skip
    session.add(model)
    session.flush()
    rng = np.random.default_rng(3)
    videos = [Video(uri=f"test://frame-cache/{model.id}/{i}", status="ready") for i in range(40)]
    session.add_all(videos)
    session.flush()
    stored = {}
    for video in videos:  # 64 frames of 128-d: 33 KB a video once read, 40 of them over 1 MB
        f = normalise(rng.normal(size=(64, 128))).astype(np.float16).astype(np.float32)
        stored[video.id] = f
        serve_queries.add_embedding(video.id, model.id, _unit(1, 8, seed=video.id)[0], frames=64, session=session,
                                    frame_vectors=f, frame_times=np.arange(64, dtype=np.float32))  # fmt: skip
    session.commit()
    ids = [v.id for v in videos]
    read = search._candidate_frames(session=session, model_id=model.id, video_ids=ids, version=None, limit_mb=1)
    assert set(read) == set(ids)
    for video_id, frames in read.items():
        np.testing.assert_array_equal(frames.vectors, stored[video_id])
    kept = [v for v in ids if (model.id, v) in search._frame_cache]
    assert 0 < len(kept) < len(ids) and kept == ids[-len(kept) :]  # the oldest went first
    assert search._frame_cache_bytes <= 1024**2
    again = search._candidate_frames(session=session, model_id=model.id, video_ids=ids[:3], version=None, limit_mb=1)
    for video_id, frames in again.items():
        np.testing.assert_array_equal(frames.vectors, stored[video_id])
    assert all((model.id, v) in search._frame_cache for v in ids[:3])
