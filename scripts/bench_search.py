"""Warm search latency: the first stage alone against both stages (frame re-rank with the
background normalisation and fusion), through ``search_library`` on the configured
Postgres, measured in the same run.

A scratch model version gets ``--n`` library videos (clustered ``--dim`` vectors, and
``--frames`` float16 frame descriptors each, ``--frame-dim`` of them, by default as a
fresh install's encoder stores them, compared under mirror images as that encoder's are) and an index
version built from them, with its copy of the frames.
``--queries`` searches run with the second stage off, then on with the candidates' frames
taken from each place they can come from (the version's copy, the worker's cache, Postgres);
the second stage's phases are timed apart (each way of reading the frames, the alignment;
the background is read once, as a worker reads it once per index version), the alignment
also with plain products, to show what matching under mirror images costs. The rows and
the version's files are deleted afterwards. The second stage's cost depends on the
candidates and their frames, not on the library's size: the first stage's at a million
videos is `bench index`'s.

    python -m scripts.bench_search --n 100000 --queries 300
"""

from __future__ import annotations

import argparse
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from sqlalchemy import delete, select
from threadpoolctl import threadpool_limits

from app.config import Settings, get_settings
from app.db import migrate, session_scope
from app.index import queries as index_queries
from app.index import rebuild, search
from app.index.frames import BACKGROUND_VIDEOS, Background, Frames, pack, unpack
from app.index.mirrors import Mirrors
from app.index.rerank import rerank
from app.index.version import IndexVersionFiles
from app.learn.encoder import INITIAL_CONFIG
from app.models import Embedding, IndexVersion, ModelVersion, Video


def _clustered(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.normal(size=(max(1, n // 50), dim))
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _percentiles(ms: list[float]) -> tuple[float, float, float]:
    a = np.asarray(ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_search", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="library videos")
    p.add_argument("--dim", type=int, default=INITIAL_CONFIG.output_dim,
                   help="video vector size (default: a fresh install's encoder's)")  # fmt: skip
    p.add_argument("--frames", type=int, default=64, help="frame descriptors per video")
    p.add_argument("--frame-dim", type=int, default=INITIAL_CONFIG.descriptor_dim,
                   help="frame descriptor size (default: a fresh install's encoder's)")  # fmt: skip
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args(argv)
    console = Console()
    settings = get_settings()
    if settings.blas_threads:  # as a worker process searches (workers/tasks.py)
        threadpool_limits(limits=settings.blas_threads, user_api="blas")
    migrate()
    rng = np.random.default_rng(0)
    dim, frame_dim = args.dim, args.frame_dim
    vectors = _clustered(args.n, dim, rng)
    with session_scope() as s:
        model = ModelVersion(
            name=f"bench-search-{uuid.uuid4().hex[:8]}",
            # A fresh install's encoder's layout (mirror components) where the size is its.
            config=INITIAL_CONFIG.to_dict() if frame_dim == INITIAL_CONFIG.descriptor_dim else {},
            checkpoint_path=None,
            dim=dim,
            trained=False,
            data_summary={"note": "scratch model of scripts/bench_search.py"},
        )
        s.add(model)
        s.flush()
        model_id = model.id
    t0 = time.perf_counter()
    for start in range(0, args.n, 1000):
        with session_scope() as s:
            videos = [
                Video(uri=f"bench://search/{model_id}/{i}", status="ready")
                for i in range(start, min(args.n, start + 1000))
            ]
            s.add_all(videos)
            s.flush()
            rows = []
            for video, vector in zip(videos, vectors[start : start + 1000], strict=True):
                frames = rng.normal(size=(args.frames, frame_dim)).astype(np.float32)
                blob, times = pack(
                    frames / np.linalg.norm(frames, axis=1, keepdims=True), np.arange(args.frames, dtype=np.float32)
                )
                rows.append(
                    Embedding(
                        video_id=video.id,
                        model_version_id=model_id,
                        vector=vector.tobytes(),
                        dim=dim,
                        frames=args.frames,
                        frame_dim=frame_dim,
                        frame_vectors=blob,
                        frame_times=times,
                    )
                )
            s.add_all(rows)
        console.print(f"\rlibrary {min(args.n, start + 1000)}/{args.n}", end="")
    console.print(f" ({time.perf_counter() - t0:.0f} s)")
    try:
        with session_scope() as s:
            model = s.get_one(ModelVersion, model_id)
            rebuild.rebuild_index(session=s, model=model, settings=settings)
        picks = rng.integers(0, args.n, args.queries)
        query_vectors = vectors[picks] + 0.2 * rng.normal(size=(args.queries, dim)).astype(np.float32)
        query_frames = [
            unpack(
                *pack(
                    rng.normal(size=(args.frames, frame_dim)).astype(np.float32),
                    np.arange(args.frames, dtype=np.float32),
                ),
                frame_dim,
            )
            for _ in range(args.queries)
        ]
        timings: dict[str, list[float]] = {
            "first stage": [],
            "both stages, frames from the index version's copy (default)": [],
            "both stages, frames in the worker's cache": [],
            "both stages, frames read from Postgres": [],
            "frames read from the copy": [],
            "frames read from Postgres": [],
            "alignment": [],
            "alignment, plain products (no mirror images)": [],
        }
        # Where the second stage finds the candidates' frames: the index version's
        # memory-mapped copy (VIDSIM_INDEX_FRAMES_FILE, default), else the worker's cache
        # of what it read (VIDSIM_RERANK_FRAME_CACHE_MB: after the warm pass, every
        # candidate's), else Postgres on every search.
        cached = settings.model_copy(update={"index_frames_file": False})
        uncached = settings.model_copy(update={"index_frames_file": False, "rerank_frame_cache_mb": 0})
        with session_scope() as s:
            model = s.get_one(ModelVersion, model_id)
            sample = index_queries.background_frames(session=s, model_id=model_id, limit=BACKGROUND_VIDEOS)
            # as search_library keeps it: read once per index version
            background = Background.of(sample, mirrors=Mirrors.of(model.config))
            plain = Background.of(sample)
            version = s.scalars(select(IndexVersion).where(IndexVersion.model_version_id == model_id)).one()
            files = IndexVersionFiles.view(Path(version.path), sha256=version.sha256, dim=dim)

            def search_once(i: int, k: int, frames: Frames | None, config: Settings = settings) -> list[search.Match]:
                return search.search_library(
                    session=s,
                    model=model,
                    query=query_vectors[i],
                    k=k,
                    exclude=set(),
                    query_frames=frames,
                    settings=config,
                )[0]

            for warm in (True, False):  # one pass to warm caches (background, index), then measured
                for i in range(args.queries):
                    measures = (
                        ("first stage", None, settings),
                        ("both stages, frames from the index version's copy (default)", query_frames[i], settings),
                        ("both stages, frames in the worker's cache", query_frames[i], cached),
                        ("both stages, frames read from Postgres", query_frames[i], uncached),
                    )
                    for name, query_side, config in measures:
                        t = time.perf_counter()
                        matches = search_once(i, args.k, query_side, config)
                        if not warm:
                            timings[name].append((time.perf_counter() - t) * 1000)
                        assert matches, "the scratch library is searched"
                    if warm:
                        continue
                    ids = [m.video_id for m in search_once(i, settings.rerank_candidates, None)]
                    t = time.perf_counter()
                    stored = index_queries.stored_frames(session=s, model_id=model_id, video_ids=ids)
                    t1 = time.perf_counter()
                    copied = files.frames_of(ids)
                    t2 = time.perf_counter()
                    rerank(query_frames[i], stored, background, locate=args.k)
                    t3 = time.perf_counter()
                    rerank(query_frames[i], stored, plain, locate=args.k)
                    timings["alignment, plain products (no mirror images)"].append((time.perf_counter() - t3) * 1000)
                    assert copied.keys() == stored.keys(), "the version's copy holds every candidate's frames"
                    timings["frames read from Postgres"].append((t1 - t) * 1000)
                    timings["frames read from the copy"].append((t2 - t1) * 1000)
                    timings["alignment"].append((t3 - t2) * 1000)
        table = Table(
            title=f"warm search, {args.n} videos, {args.frames} frames of {frame_dim}-d each, "
            f"{settings.rerank_candidates} candidates re-ranked, k={args.k}"
        )
        for col in ("", "p50 ms", "p99 ms", "mean ms"):
            table.add_column(col, justify="right" if col else "left")
        for name, ms in timings.items():
            p50, p99, mean = _percentiles(ms)
            table.add_row(name, f"{p50:.2f}", f"{p99:.2f}", f"{mean:.2f}")
        console.print(table)
        first = _percentiles(timings["first stage"])
        both = _percentiles(timings["both stages, frames from the index version's copy (default)"])
        console.print(f"both stages / first stage: p50 x{both[0] / first[0]:.2f}, p99 x{both[1] / first[1]:.2f}")
    finally:
        with session_scope() as s:
            for path in s.scalars(select(IndexVersion.path).where(IndexVersion.model_version_id == model_id)):
                shutil.rmtree(Path(path).parent, ignore_errors=True)
            s.execute(delete(IndexVersion).where(IndexVersion.model_version_id == model_id))
            s.execute(delete(Embedding).where(Embedding.model_version_id == model_id))
            s.execute(delete(Video).where(Video.uri.like(f"bench://search/{model_id}/%")))
            s.execute(delete(ModelVersion).where(ModelVersion.id == model_id))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
