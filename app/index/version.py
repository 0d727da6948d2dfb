"""An index version on disk, opened and searched: the files checked against the manifest,
then memory-mapped (USearch ``view``), and searched by cosine.

The index is a derived cache of the embeddings in the database, built for one model
version (``app.index.build``). A version is a directory holding:

- ``manifest.json``: the build parameters and the sha256 of every other file (the
  database row holds the manifest's own sha256, so the chain of trust starts there);
- ``shard-{s}.usearch``: one HNSW graph per shard (keys are row numbers in the shard);
- ``keys-{s}.npy``: the video id of each row of shard ``s`` (uint64);
- ``vectors-{s}.npy``: a float copy of the L2-normalised embeddings of shard ``s``,
  memory-mapped, for exact cosine re-ranking (only when the version re-ranks from its
  own files; with ``rerank_from="database"`` the caller reads the candidates'
  embeddings from the system of record instead, and the version holds no copy);
- ``transform-*.npy``: what was learned at build time and applied to queries too (mean,
  PCA directions, whitening scales, ITQ rotation; ``app.index.transform``);
- ``background.npy``: a fixed random sample of library vectors for calibrated scores;
- ``frames.f16`` (with ``frame-keys.npy``, ``frame-offsets.npy``, ``frame-times.npy``):
  a copy of the library videos' frame descriptors for the second stage of a search
  (``app.index.frames``), memory-mapped, so that a candidate's frames are a slice of a
  file in the page cache rather than a Postgres row (48 KB of TOAST chunks for a
  64-frame video of the initial encoder); only where the build was given them (``settings.index_frames_file``).

Every file is checksummed before USearch or numpy reads it: a corrupt or foreign
version is refused (``IndexFileError``) and the caller keeps serving the previous one.

The graph is searched with the coarse representation (``IndexParams.mode``), then
candidates can be re-ranked by exact cosine with the float copy or with the embeddings
the caller reads from the database (``rerank``, ``rerank_from``), so the scores
returned are always the cosine of the embeddings themselves, comparable with the exact
search over fresh additions that the caller merges in.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from usearch.index import BatchMatches, Index

from app.index.frames import Frames, as_float32
from app.index.hits import Hit, merge
from app.index.params import IndexParams
from app.index.transform import Transform, coarse_representation, normalise

FORMAT = "vidsim-index/2"
MANIFEST = "manifest.json"


# Reads the stored embeddings of these video ids: float32 (len(ids), D) in the order
# asked, a row of NaN for an id it does not hold (deleted since the build).
VectorsOf = Callable[[np.ndarray], np.ndarray]
# Reads the frame descriptors of these video ids; an id without frames is absent.
FramesOf = Callable[[np.ndarray], dict[int, Frames]]
FRAMES = "frames.f16"


class IndexFileError(Exception):
    """An index file that must not be served (missing, corrupt, foreign)."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def _pool(pid: int) -> concurrent.futures.ThreadPoolExecutor:
    # One pool per process (pid in the key: threads do not survive a fork). USearch
    # releases the GIL while it searches, so shards run in parallel.
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="shard")


@dataclass
class _Shard:
    index: Index
    keys: np.ndarray  # (n,) uint64 video ids by row
    vectors: np.ndarray | None  # (n, D) memory-mapped float copy, or None


@dataclass
class _FrameCopy:
    """The version's copy of its videos' frame descriptors: ``keys`` (V,) ascending,
    video v's frames in rows ``offsets[v]:offsets[v + 1]`` of ``vectors`` (F, D) float16
    (memory-mapped) and ``times`` (F,)."""

    keys: np.ndarray
    offsets: np.ndarray
    vectors: np.ndarray
    times: np.ndarray

    @classmethod
    def open(cls, directory: Path, info: dict[str, int]) -> _FrameCopy:
        keys = np.load(directory / "frame-keys.npy", allow_pickle=False).astype(np.int64)
        offsets = np.load(directory / "frame-offsets.npy", allow_pickle=False)
        times = np.load(directory / "frame-times.npy", allow_pickle=False)
        total, dim = int(info["frames"]), int(info["dim"])
        if (
            (directory / FRAMES).stat().st_size != total * dim * 2
            or len(keys) != info["videos"]
            or offsets.shape != (len(keys) + 1,)
            or int(offsets[-1]) != total
            or times.shape != (total,)
        ):
            raise IndexFileError(f"index frame copy {directory}/{FRAMES} does not match its manifest")
        # A plain array over the mapping: slicing an np.memmap builds a memmap object per
        # slice (20 us a candidate, against 2 us).
        vectors = np.asarray(np.memmap(directory / FRAMES, dtype=np.float16, mode="r", shape=(total, dim)))
        return cls(keys, offsets, vectors, times)

    def of(self, video_ids: list[int]) -> dict[int, Frames]:
        """The frames of those of ``video_ids`` the copy holds, as float32."""
        at = np.searchsorted(self.keys, video_ids).clip(0, max(len(self.keys) - 1, 0))
        held = (self.keys[at] == video_ids) if len(self.keys) else np.zeros(len(video_ids), dtype=bool)
        found = [v for v, kept in zip(video_ids, held.tolist(), strict=True) if kept]
        if not found:
            return {}
        starts, ends = self.offsets[at[held]].tolist(), self.offsets[at[held] + 1].tolist()
        # One gather of the float16 rows and one conversion, split into each video's.
        vectors = as_float32(np.concatenate([self.vectors[a:b] for a, b in zip(starts, ends, strict=True)]))
        times = np.concatenate([self.times[a:b] for a, b in zip(starts, ends, strict=True)]).astype(np.float64)
        bounds = np.cumsum([b - a for a, b in zip(starts, ends, strict=True)])[:-1]
        return {
            video_id: Frames(v, t)
            for video_id, v, t in zip(found, np.split(vectors, bounds), np.split(times, bounds), strict=True)
        }


class IndexVersionFiles:
    """An opened version: every file checked against the manifest, USearch graphs
    memory-mapped (``view``), float copies memory-mapped read-only."""

    def __init__(self, *, manifest: dict[str, Any], shards: list[_Shard], transform: Transform,
                 background: np.ndarray, path: Path, frames: _FrameCopy | None = None) -> None:  # fmt: skip
        self.manifest = manifest
        self.params = IndexParams.from_dict(manifest["params"])
        self.dim = int(manifest["dim"])
        self.path = path
        self._shards = shards
        self._transform = transform
        self.background = background  # (B, D) float32, L2-normalised
        self._frames = frames

    @classmethod
    def view(cls, manifest_path: Path, *, sha256: str, dim: int) -> IndexVersionFiles:
        """Verifies the manifest against ``sha256`` and every file against the manifest,
        then opens them. Nothing is memory-mapped before its checksum matched."""
        manifest_path = Path(manifest_path)
        directory = manifest_path.parent
        if not manifest_path.is_file():
            raise IndexFileError(f"index manifest {manifest_path} is missing")
        actual = sha256_of(manifest_path)
        if actual != sha256:
            raise IndexFileError(f"index manifest {manifest_path} is corrupt (sha256 {actual[:12]} != {sha256[:12]})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise IndexFileError(f"index manifest {manifest_path} is not JSON: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise IndexFileError(f"index {directory} has format {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("dim") != dim:
            raise IndexFileError(f"index {directory} holds {manifest.get('dim')}-d vectors, expected {dim}")
        for name, digest in manifest["files"].items():
            path = directory / name
            if "/" in name or not path.is_file():
                raise IndexFileError(f"index file {path} is missing")
            if sha256_of(path) != digest:
                raise IndexFileError(f"index file {path} is corrupt (sha256 mismatch)")
        params = IndexParams.from_dict(manifest["params"])
        shards = []
        for s, info in enumerate(manifest["shards"]):
            index = Index.restore(str(directory / f"shard-{s}.usearch"), view=True)
            if index is None or index.ndim != info["ndim"] or len(index) != info["count"]:
                raise IndexFileError(f"index shard {directory}/shard-{s}.usearch does not match its manifest")
            index.expansion_search = params.expansion_search  # type: ignore[misc,assignment]  # (it has a setter)
            keys = np.load(directory / f"keys-{s}.npy", allow_pickle=False)
            vectors = None
            if params.float_copy:
                vectors = np.load(directory / f"vectors-{s}.npy", mmap_mode="r", allow_pickle=False)
                if vectors.shape != (info["count"], dim):
                    raise IndexFileError(f"index float copy {directory}/vectors-{s}.npy has shape {vectors.shape}")
            shards.append(_Shard(index, keys, vectors))
        transform = Transform(
            **{n: np.load(directory / f"transform-{n}.npy", allow_pickle=False) for n in manifest["transform"]}
        )
        background = np.load(directory / "background.npy", allow_pickle=False)
        frames = _FrameCopy.open(directory, manifest["frames"]) if manifest.get("frames") else None
        return cls(manifest=manifest, shards=shards, transform=transform, background=background, path=directory,
                   frames=frames)  # fmt: skip

    def configure(self, *, expansion_search: int | None = None, rerank: int | None = None) -> IndexVersionFiles:
        """Changes the search-time knobs (the graph's ef, how many candidates are
        re-ranked) without a rebuild. Re-ranking from files needs the copy the build kept."""
        changes: dict[str, Any] = {}
        if expansion_search is not None:
            changes["expansion_search"] = expansion_search
            for shard in self._shards:
                shard.index.expansion_search = expansion_search  # type: ignore[misc]  # (it has a setter)
        if rerank is not None:
            copies = self.params.rerank_from == "file"
            if rerank > 0 and copies and any(s.vectors is None for s in self._shards):
                raise ValueError("this index version kept no float copy to re-rank with")
            changes["rerank"] = rerank
        if changes:
            self.params = dataclasses.replace(self.params, **changes)
        return self

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def has_frames(self) -> bool:
        return self._frames is not None

    def frames_of(self, video_ids: list[int]) -> dict[int, Frames]:
        """The frame descriptors of those of ``video_ids`` this version keeps a copy of
        (none without a copy)."""
        return self._frames.of(video_ids) if self._frames is not None and video_ids else {}

    @property
    def hot_bytes(self) -> int:
        """Bytes that must stay in memory for fast searches: graphs, codes, keys and the
        transform; the float copy and the frames are only read for the candidates being
        re-ranked."""
        cold = ("vectors-", FRAMES, "frame-times")
        return sum((self.path / n).stat().st_size for n in self.manifest["files"] if not n.startswith(cold))

    @property
    def nbytes(self) -> int:
        return sum((self.path / name).stat().st_size for name in [*self.manifest["files"], MANIFEST])

    def search(self, query: np.ndarray, k: int, *, exact: bool = False,
               vectors_of: VectorsOf | None = None) -> list[Hit]:  # fmt: skip
        """Top ``k`` by cosine of one query (D,); ``exact`` scans the coarse vectors
        instead of walking the graph (on f32 without reduction: exact cosine). A version
        that re-ranks from the database reads its candidates through ``vectors_of``."""
        if k <= 0 or len(self) == 0:
            return []
        from_database = self._check_vectors_of(vectors_of)
        q = normalise(np.asarray(query, dtype=np.float32).reshape(-1))
        coarse = coarse_representation(q[None, :], self._transform, self.params)[0]
        shards = [s for s in self._shards if len(s.keys)]
        if len(shards) == 1:
            parts = [self._search_shard(shards[0], q, coarse, k, exact)]
        else:
            pool = _pool(os.getpid())
            parts = list(pool.map(lambda s: self._search_shard(s, q, coarse, k, exact), shards))
        if not from_database:
            return merge(*parts, k=k)
        # Every shard's candidates re-ranked together: one read of the store per search.
        ids = np.array([h.key for part in parts for h in part], dtype=np.int64)
        scores = normalise(vectors_of(ids)) @ q if len(ids) else np.zeros(0, np.float32)  # type: ignore[misc]
        return merge([Hit(int(i), float(c)) for i, c in zip(ids, scores, strict=True) if np.isfinite(c)], k=k)

    def _check_vectors_of(self, vectors_of: VectorsOf | None) -> bool:
        if not self.params.reranks_from_database:
            return False
        if vectors_of is None:
            raise ValueError("this index version re-ranks with embeddings read from the database: pass vectors_of")
        return True

    def _search_shard(self, shard: _Shard, q: np.ndarray, coarse: np.ndarray, k: int, exact: bool) -> list[Hit]:
        """The shard's top ``k`` re-ranked by its float copy, or (no copy) every candidate
        with its coarse score."""
        fetch = min(len(shard.keys), max(k, self.params.rerank))
        exact = exact or len(shard.keys) <= self.params.exact_below
        found = shard.index.search(coarse, fetch, exact=exact)
        rows = np.asarray(found.keys, dtype=np.int64)
        if shard.vectors is None:
            scores = 1.0 - np.asarray(found.distances, dtype=np.float32)
            return [Hit(int(shard.keys[r]), float(c)) for r, c in zip(rows, scores, strict=True)]
        order = np.argsort(rows)  # memory-map locality
        rows = rows[order]
        scores = shard.vectors[rows].astype(np.float32) @ q  # (fetch,) exact cosine
        top = np.argsort(-scores, kind="stable")[:k]
        return [Hit(int(shard.keys[rows[i]]), float(scores[i])) for i in top]

    def search_batch(self, queries: np.ndarray, k: int, *, threads: int = 0,
                     vectors_of: VectorsOf | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Top ``k`` of many queries (B, D) at once (USearch's multi-threaded batch search,
        then a vectorised re-rank): video ids (B, k) and cosines (B, k), -1 / -inf padded."""
        from_database = self._check_vectors_of(vectors_of)
        q = normalise(queries)
        coarse = coarse_representation(q, self._transform, self.params)
        all_keys, all_scores = [], []
        for shard in self._shards:
            if not len(shard.keys):
                continue
            fetch = min(len(shard.keys), max(k, self.params.rerank))
            exact = len(shard.keys) <= self.params.exact_below
            found = shard.index.search(coarse, fetch, threads=threads, exact=exact)
            assert isinstance(found, BatchMatches)
            rows = np.asarray(found.keys, dtype=np.int64).reshape(len(q), -1)  # (B, fetch)
            valid = np.arange(rows.shape[1])[None, :] < np.asarray(found.counts)[:, None]
            rows = np.where(valid, rows, 0)
            copy = shard.vectors
            if copy is not None:
                scores = _block_cosines(lambda block: copy[block], rows, q)  # noqa: B023 (called at once)
            else:
                scores = 1.0 - np.asarray(found.distances, dtype=np.float32).reshape(rows.shape)
            all_keys.append(np.where(valid, shard.keys[rows].astype(np.int64), -1))
            all_scores.append(np.where(valid, scores, -np.inf))
        keys, scores = np.concatenate(all_keys, axis=1), np.concatenate(all_scores, axis=1)
        if from_database:
            unique = np.unique(keys[keys >= 0])
            stored = vectors_of(unique)  # type: ignore[misc]  # one read for the whole batch
            at = np.searchsorted(unique, keys).clip(0, len(unique) - 1)  # (B, F) rows of ``stored``
            scores = _block_cosines(lambda block: stored[block], at, q)
            scores = np.where((keys >= 0) & np.isfinite(scores), scores, -np.inf)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(keys, top, 1), np.take_along_axis(scores, top, 1)


def _block_cosines(gather: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(B, F) cosines of each query with the rows ``gather`` returns for its candidates,
    in blocks of 64 queries (keeps the gathered (64, F, D) copy small)."""
    scores = np.empty(rows.shape, dtype=np.float32)
    for b in range(0, len(q), 64):
        block = rows[b : b + 64]
        gathered = normalise(gather(block.reshape(-1))).reshape(*block.shape, -1)
        scores[b : b + 64] = np.einsum("bfd,bd->bf", gathered, q[b : b + 64])
    return scores
