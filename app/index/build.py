"""Building an index version: the files of one version written from (keys, vectors)
arrays into a new directory, checksummed, then renamed into place so a reader sees all
of it or nothing. What the directory holds is described in ``app.index.version``."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from usearch.index import Index

from app.index.frames import Frames
from app.index.params import IndexParams
from app.index.transform import coarse_representation, fit_transform, normalise
from app.index.version import FORMAT, FRAMES, MANIFEST, FramesOf, sha256_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltIndex:
    """What a build wrote: the manifest's path and sha256 (recorded in the IndexVersion
    row, where the chain of trust starts) and what the row records of the build."""

    path: Path
    sha256: str
    size: int
    dim: int
    dtype: str
    seconds: float
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    bytes: int = 0  # all files of the version


def shard_of(keys: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each key: splitmix64(key) mod ``shards``, stable across machines and
    processes (Python's hash() is salted per process)."""
    z = np.asarray(keys, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z % np.uint64(max(1, shards))).astype(np.int64)


def _new_usearch(ndim: int, params: IndexParams) -> Index:
    if params.mode == "hash":
        metric, dtype = "hamming", "b1"
    else:
        metric, dtype = "cos", params.dtype
    return Index(
        ndim=ndim,
        metric=metric,
        dtype=dtype,
        connectivity=params.connectivity,
        expansion_add=params.expansion_add,
        expansion_search=params.expansion_search,
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def build_version(
    *,
    keys: np.ndarray,
    vectors: np.ndarray,
    directory: Path,
    params: IndexParams | None = None,
    frames_of: FramesOf | None = None,
) -> BuiltIndex:
    """Builds a version of ``vectors`` (N, D) keyed by ``keys`` (N,) into ``directory``
    (which must not exist yet): written under a temporary name, synced, then renamed, so
    a reader sees all of it or nothing. With ``frames_of`` (video ids -> their frame
    descriptors), the version also keeps a copy of the videos' frames for the second
    stage. Returns the manifest's path and sha256."""
    params = params or IndexParams()
    started = time.perf_counter()
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    vectors = normalise(vectors)
    if vectors.ndim != 2 or len(keys) != len(vectors):
        raise ValueError(f"keys {keys.shape} and vectors {vectors.shape} do not match")
    if len(np.unique(keys)) != len(keys):
        raise ValueError("keys must be unique")
    n, dim = vectors.shape
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f"{directory.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    timings: dict[str, float] = {}
    try:
        t = time.perf_counter()
        transform = fit_transform(vectors, params)
        for name, array in transform.arrays().items():
            _save_npy(tmp / f"transform-{name}.npy", array)
        timings["fit_s"] = time.perf_counter() - t

        t = time.perf_counter()
        shard_ids = shard_of(keys, params.shards)
        coarse_dim = int(transform.apply(vectors[:1]).shape[1])
        # Hash codes are packed 8 bits a byte; padding bits are 0 in every code.
        ndim = coarse_dim if params.mode != "hash" else 8 * -(-coarse_dim // 8)

        def build_shard(s: int) -> dict[str, Any]:
            rows = np.flatnonzero(shard_ids == s)
            coarse = coarse_representation(vectors[rows], transform, params) if len(rows) else None
            index = _new_usearch(ndim, params)
            if coarse is not None:
                # One batch call (capacity reserved up front), by ``build_threads``
                # threads: concurrent insertion strands nodes (usearch#735). Keys are
                # row numbers within the shard.
                index.add(np.arange(len(rows), dtype=np.uint64), coarse, threads=params.build_threads, log=False)
            index.save(str(tmp / f"shard-{s}.usearch"))
            _save_npy(tmp / f"keys-{s}.npy", keys[rows])
            if params.float_copy:
                _save_npy(tmp / f"vectors-{s}.npy", vectors[rows].astype(np.dtype(_NP_FLOAT[params.rerank_dtype])))
            return {"count": len(rows), "ndim": ndim, "self_recall": _self_recall(index, coarse, params)}

        # Shards build in parallel, each graph by its own thread(s) (USearch releases the GIL).
        workers = max(1, min(params.shards, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            shards = list(pool.map(build_shard, range(params.shards)))
        timings["index_s"] = time.perf_counter() - t
        recalls = [info["self_recall"] for info in shards if info["self_recall"] is not None]
        self_recall = min(recalls) if recalls else None
        if self_recall is not None and self_recall < 0.99:
            logger.warning("index %s: the graph finds only %.3f of its own vectors (self-queries)", directory,
                           self_recall)  # fmt: skip

        rng = np.random.default_rng(params.seed + 1)
        background = vectors[np.sort(rng.choice(n, min(n, params.background), replace=False))] if n else vectors
        _save_npy(tmp / "background.npy", background)

        frame_copy = None
        if frames_of is not None:
            t = time.perf_counter()
            frame_copy = _write_frames(tmp, np.sort(keys), frames_of)
            timings["frames_s"] = time.perf_counter() - t

        files = {}
        for path in sorted(tmp.iterdir()):
            _fsync(path)
            files[path.name] = sha256_of(path)
        manifest = {
            "format": FORMAT,
            "dim": dim,
            "coarse_dim": coarse_dim,
            "count": n,
            "params": params.to_dict(),
            "shards": shards,
            "transform": sorted(transform.arrays()),
            "frames": frame_copy,
            "files": files,
            "timings": timings,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _fsync(tmp / MANIFEST)
        total = sum(p.stat().st_size for p in tmp.iterdir())
        os.rename(tmp, directory)  # atomic: readers see the whole directory or none
        _fsync(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    built = BuiltIndex(
        path=directory / MANIFEST,
        sha256=sha256_of(directory / MANIFEST),
        size=n,
        dim=dim,
        dtype=params.storage,
        seconds=time.perf_counter() - started,
        params={**params.to_dict(), "format": FORMAT, "self_recall": self_recall},
        bytes=total,
    )
    logger.info(
        "built index %s: %d vectors, dim %d, %s, %d shard(s), %.1f bytes/vector, %.2fs (%s)",
        directory, n, dim, params.storage, params.shards, total / max(1, n), built.seconds,
        ", ".join(f"{k} {v:.2f}" for k, v in timings.items()),
    )  # fmt: skip
    return built


_NP_FLOAT = {"f32": "float32", "f16": "float16"}
_FRAME_READ = 2048  # videos whose frames are read (and held) at a time


def _write_frames(tmp: Path, keys: np.ndarray, frames_of: FramesOf) -> dict[str, int] | None:
    """The videos' frame descriptors, read ``_FRAME_READ`` videos at a time and written
    one after another (float16, as stored) to ``FRAMES``, beside each video's first row
    (``frame-offsets.npy``, one more than videos), the frames' times and the ids of the
    videos that have frames (ascending ``keys``; rows from before frame descriptors have
    none). Returns the manifest's entry (None when no video has frames)."""
    with_frames: list[int] = []
    offsets, times = [0], []
    dim = 0
    with open(tmp / FRAMES, "wb") as out:
        for start in range(0, len(keys), _FRAME_READ):
            read: dict[int, Frames] = frames_of(keys[start : start + _FRAME_READ])
            for key in keys[start : start + _FRAME_READ].tolist():
                frames = read.get(key)
                if frames is None or not len(frames):
                    continue
                if dim and frames.vectors.shape[1] != dim:
                    raise ValueError(f"video {key} has {frames.vectors.shape[1]}-d frames, others {dim}-d")
                dim = frames.vectors.shape[1]
                out.write(np.asarray(frames.vectors, dtype=np.float16).tobytes())
                times.append(np.asarray(frames.times, dtype=np.float32))
                with_frames.append(key)
                offsets.append(offsets[-1] + len(frames))
    if not with_frames:
        (tmp / FRAMES).unlink()
        return None
    _save_npy(tmp / "frame-keys.npy", np.asarray(with_frames, dtype=np.uint64))
    _save_npy(tmp / "frame-offsets.npy", np.asarray(offsets, dtype=np.int64))
    _save_npy(tmp / "frame-times.npy", np.concatenate(times))
    return {"videos": len(with_frames), "frames": offsets[-1], "dim": dim}


def _self_recall(index: Index, coarse: np.ndarray | None, params: IndexParams, sample: int = 1000) -> float | None:
    """A build-quality check: the fraction of a sample of the shard's own vectors that
    its graph finds among the candidates a search looks at (the top 10, or the top
    ``rerank``). Below ~0.99 the graph strands nodes: raise connectivity/expansion_add."""
    if coarse is None or len(coarse) == 0:
        return None
    rows = np.random.default_rng(params.seed + 2).choice(len(coarse), min(sample, len(coarse)), replace=False)
    count = min(len(coarse), max(10, params.rerank))
    found = index.search(coarse[rows], count)
    keys = np.asarray(found.keys, dtype=np.int64).reshape(len(rows), -1)
    return float((keys == rows[:, None]).any(axis=1).mean())
