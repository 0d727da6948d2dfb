"""Vector index over USearch: build a version, open it memory-mapped, search it.

The index is a derived cache of the embeddings in the database, built for one model
version. A version is a directory written under a temporary name and renamed into
place, holding:

- ``manifest.json``: the build parameters and the sha256 of every other file (the
  database row holds the manifest's own sha256, so the chain of trust starts there);
- ``shard-{s}.usearch``: one HNSW graph per shard (keys are row numbers in the shard);
- ``keys-{s}.npy``: the video id of each row of shard ``s`` (uint64);
- ``vectors-{s}.npy``: a float copy of the L2-normalised embeddings of shard ``s``,
  memory-mapped, for exact cosine re-ranking (only when the version re-ranks from its
  own files; with ``rerank_from="database"`` the caller reads the candidates'
  embeddings from the system of record instead, and the version holds no copy);
- ``transform-*.npy``: what was learned at build time and applied to queries too (mean,
  PCA directions, whitening scales, ITQ rotation);
- ``background.npy``: a fixed random sample of library vectors for calibrated scores.

Every file is checksummed before USearch or numpy reads it: a corrupt or foreign
version is refused (``IndexFileError``) and the caller keeps serving the previous one.

Two coarse representations search the graph (``IndexParams.mode``):

- ``hnsw``: the (optionally PCA-reduced) vectors stored as f32, f16 or i8 (quantised
  here, ``x / max|x| * 127``: USearch's own float-to-i8 conversion loses recall);
- ``hash``: binary codes (sign bits of the centred, rotated vectors; the rotation is
  PCA, ITQ learned on the library, or none) searched by Hamming distance.

Candidates can then be re-ranked by exact cosine with the float copy or with the
embeddings the caller reads from the database (``rerank``, ``rerank_from``), so
the scores returned are always the cosine of the embeddings themselves, comparable with
the exact search over fresh additions that the caller merges in.

The older single-file format (``build`` / ``VectorIndex``) stays readable.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from usearch.index import BatchMatches, Index

logger = logging.getLogger(__name__)

FORMAT = "vidsim-index/2"
MANIFEST = "manifest.json"


# Reads the stored embeddings of these video ids: float32 (len(ids), D) in the order
# asked, a row of NaN for an id it does not hold (deleted since the build).
VectorsOf = Callable[[np.ndarray], np.ndarray]


# The search expansion (ef) a version is served with unless set, by mode, measured at 1M
# vectors (scripts/bench_index.py): f16 HNSW recall@5 0.995 at 96 (p99 0.92 ms); hash
# codes re-ranked with the stored embeddings 0.990 at 128, 0.996 at 256.
DEFAULT_EXPANSION_SEARCH = {"hnsw": 96, "hash": 256}


class IndexFileError(Exception):
    """An index file that must not be served (missing, corrupt, foreign)."""


@dataclass(frozen=True)
class Hit:
    key: int
    score: float  # cosine similarity, 1.0 = same direction


@dataclass(frozen=True)
class BuiltIndex:
    path: Path
    sha256: str
    size: int
    dim: int
    dtype: str
    seconds: float
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    bytes: int = 0  # all files of the version


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalised float32 rows (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def quantise_i8(x: np.ndarray) -> np.ndarray:
    """Per-vector symmetric int8 (x / max|x| * 127). Cosine is scale-free, so the per-row
    scale need not be kept."""
    x = np.asarray(x, dtype=np.float32)
    peak = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-12)
    return np.rint(x / peak * 127.0).astype(np.int8)


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


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class IndexParams:
    """How a version is built and searched; stored in ``IndexVersion.params``."""

    mode: Literal["hnsw", "hash"] = "hnsw"
    dtype: Literal["f32", "f16", "i8"] = "f16"  # hnsw storage (hash: always b1)
    connectivity: int = 16  # HNSW M: links per node (level 0 has 2M)
    expansion_add: int = 128  # ef at build time
    # ef at query time (raised to the count asked for); None: DEFAULT_EXPANSION_SEARCH
    expansion_search: int | None = None
    shards: int = 1
    pca_dim: int | None = None  # learned reduction before indexing (None: full dimension)
    pca_whiten: bool = False
    hash_bits: int | None = None  # None: the (reduced) dimension, rounded down to 8
    hash_rotation: Literal["none", "pca", "itq"] = "itq"
    rerank: int = 0  # candidates re-ranked by exact cosine of the embeddings (0: off)
    # Where re-ranking reads the candidates' embeddings: ``file``, a float copy written
    # beside the graph (rerank_dtype; fastest, ~2 bytes per dimension per video more on
    # disk); ``database``, the caller's ``vectors_of`` (the system of record, one read of
    # ``rerank`` rows per search; the version keeps only graph and codes).
    rerank_from: Literal["file", "database"] = "file"
    rerank_dtype: Literal["f32", "f16"] = "f16"
    background: int = 1000  # library vectors kept for calibrated scores
    # A shard this small is scanned exactly instead of walking its graph (search-time):
    # a scan of a few thousand vectors costs well under a millisecond, and HNSW can miss
    # vectors of data without neighbourhood structure (random vectors, tiny libraries).
    exact_below: int = 5000
    fit_sample: int = 20_000  # vectors the PCA / ITQ are learned on
    # Threads inserting into one graph (0: all cores). More than one strands nodes that
    # no search reaches (usearch#735; measured self-recall 0.998 with 2 threads against
    # 0.9996 with one at 100k); shards build in parallel instead.
    build_threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("hnsw", "hash"):
            raise ValueError(f"unknown index mode {self.mode!r}")
        if self.expansion_search is None:
            object.__setattr__(self, "expansion_search", DEFAULT_EXPANSION_SEARCH[self.mode])
        if self.dtype not in ("f32", "f16", "i8"):
            raise ValueError(f"unknown index dtype {self.dtype!r}")
        # Scores must be cosines of the embeddings (they are merged with exact scores of
        # fresh additions and calibrated): Hamming or reduced-space scores are re-ranked.
        if self.mode == "hash" and self.rerank <= 0:
            raise ValueError("hash mode needs rerank > 0 (Hamming distances are not cosines)")
        if self.pca_dim is not None and self.rerank <= 0:
            raise ValueError("a PCA-reduced index needs rerank > 0 (reduced-space scores are not cosines)")
        if self.rerank_from not in ("file", "database"):
            raise ValueError(f"unknown rerank_from {self.rerank_from!r}")
        if self.shards < 1 or self.connectivity < 2:
            raise ValueError("shards must be >= 1 and connectivity >= 2")

    @property
    def storage(self) -> str:
        return "b1" if self.mode == "hash" else self.dtype

    @property
    def float_copy(self) -> bool:
        """Whether the version keeps a float copy of its vectors to re-rank with."""
        return self.rerank > 0 and self.rerank_from == "file"

    @property
    def reranks_from_database(self) -> bool:
        return self.rerank > 0 and self.rerank_from == "database"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexParams:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------- learned transform


@dataclass(frozen=True)
class Transform:
    """x (N, D) -> (x - mean) @ components * scale @ rotation, each step optional. Learned
    on the library at build time and applied to the queries the same way."""

    mean: np.ndarray | None = None  # (D,)
    components: np.ndarray | None = None  # (D, d) PCA directions as columns
    scale: np.ndarray | None = None  # (d,) whitening: 1 / sqrt(eigenvalue)
    rotation: np.ndarray | None = None  # (d, d) ITQ rotation

    def __post_init__(self) -> None:
        # The linear steps folded into one (D, d) matrix: one product per query.
        matrix = self.components
        if self.scale is not None:
            matrix = matrix * self.scale if matrix is not None else np.diag(self.scale)
        if self.rotation is not None:
            matrix = matrix @ self.rotation if matrix is not None else self.rotation
        object.__setattr__(self, "_matrix", None if matrix is None else np.ascontiguousarray(matrix, np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, dtype=np.float32)
        if self.mean is not None:
            y = y - self.mean
        matrix = self._matrix  # type: ignore[attr-defined]
        if matrix is not None:
            y = y @ matrix
        return np.ascontiguousarray(y, dtype=np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            n: getattr(self, n) for n in ("mean", "components", "scale", "rotation") if getattr(self, n) is not None
        }


def fit_pca(sample: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (D,), top-``dim`` directions (D, dim) and their variances (dim,)."""
    mean = sample.mean(axis=0)
    centred = (sample - mean).astype(np.float64)
    cov = centred.T @ centred / max(1, len(sample) - 1)  # (D, D)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:dim]
    return mean.astype(np.float32), vectors[:, order].astype(np.float32), values[order].astype(np.float32)


def fit_itq(projected: np.ndarray, *, iterations: int = 30, seed: int = 0) -> np.ndarray:
    """Iterative quantisation (Gong & Lazebnik 2011): the rotation R (d, d) that minimises
    ||sign(VR) - VR||, alternating the codes and an orthogonal Procrustes step."""
    d = projected.shape[1]
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    v = projected.astype(np.float32)
    for _ in range(iterations):
        codes = np.where(v @ rotation >= 0, 1.0, -1.0).astype(np.float32)  # (n, d)
        u, _, wt = np.linalg.svd(v.T @ codes)  # Procrustes: argmax_R tr(R^T V^T B)
        rotation = u @ wt
    return rotation.astype(np.float32)


def fit_transform(vectors: np.ndarray, params: IndexParams) -> Transform:
    """What the coarse representation needs learned from the library (may be nothing)."""
    dim = vectors.shape[1]
    reduce = params.pca_dim is not None and params.pca_dim < dim
    hashing = params.mode == "hash"
    if not (reduce or hashing) or len(vectors) < 2:
        return Transform()
    rng = np.random.default_rng(params.seed)
    sample = vectors[np.sort(rng.choice(len(vectors), min(len(vectors), params.fit_sample), replace=False))]
    out_dim = params.pca_dim if reduce and params.pca_dim is not None else dim
    if hashing:
        bits = params.hash_bits or out_dim
        out_dim = min(out_dim, bits)
    if hashing and params.hash_rotation == "none" and not reduce:
        return Transform(mean=sample.mean(axis=0).astype(np.float32))  # sign bits of the centred vector
    mean, components, variances = fit_pca(sample, out_dim)
    scale = (1.0 / np.sqrt(np.maximum(variances, 1e-12))).astype(np.float32) if params.pca_whiten else None
    rotation = None
    if hashing and params.hash_rotation == "itq":
        projected = (sample - mean) @ components
        if scale is not None:
            projected = projected * scale
        # A few thousand rows and 20 rounds: ITQ converges fast and costs O(n d^2) a round.
        rotation = fit_itq(projected[:5000], iterations=20, seed=params.seed)
    return Transform(mean=mean, components=components, scale=scale, rotation=rotation)


# --------------------------------------------------------------------------- building


def _coarse(vectors: np.ndarray, transform: Transform, params: IndexParams) -> np.ndarray:
    """The representation the graph is built on, for rows (N, D) or one query (D,)."""
    y = transform.apply(vectors)
    if params.mode == "hash":
        return np.packbits(y > 0, axis=-1)  # (N, bits/8) uint8
    if params.dtype == "i8":
        return quantise_i8(y)
    return y


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
) -> BuiltIndex:
    """Builds a version of ``vectors`` (N, D) keyed by ``keys`` (N,) into ``directory``
    (which must not exist yet): written under a temporary name, synced, then renamed, so
    a reader sees all of it or nothing. Returns the manifest's path and sha256."""
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
            coarse = _coarse(vectors[rows], transform, params) if len(rows) else None
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


# --------------------------------------------------------------------------- searching


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


class IndexVersionFiles:
    """An opened version: every file checked against the manifest, USearch graphs
    memory-mapped (``view``), float copies memory-mapped read-only."""

    def __init__(self, *, manifest: dict[str, Any], shards: list[_Shard], transform: Transform,
                 background: np.ndarray, path: Path) -> None:  # fmt: skip
        self.manifest = manifest
        self.params = IndexParams.from_dict(manifest["params"])
        self.dim = int(manifest["dim"])
        self.path = path
        self._shards = shards
        self._transform = transform
        self.background = background  # (B, D) float32, L2-normalised

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
            index.expansion_search = params.expansion_search  # type: ignore[misc]  # (it has a setter)
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
        return cls(manifest=manifest, shards=shards, transform=transform, background=background, path=directory)

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
    def hot_bytes(self) -> int:
        """Bytes that must stay in memory for fast searches: graphs, codes, keys and the
        transform; the float copy is only read for the candidates being re-ranked."""
        return sum((self.path / n).stat().st_size for n in self.manifest["files"] if not n.startswith("vectors-"))

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
        coarse = _coarse(q[None, :], self._transform, self.params)[0]
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
        coarse = _coarse(q, self._transform, self.params)
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
            if shard.vectors is not None:
                scores = _block_cosines(lambda block: shard.vectors[block], rows, q)  # noqa: B023 (called at once)
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


# --------------------------------------------------------------------------- calibration


# Calibrated score: (cos - t_q) / (1 - t_q), where t_q is this percentile of the query's
# cosines to the background sample. 1 = identical, 0 = as similar as the query's top 1%
# of the library, below 0 = commonplace for this query. Measured (scripts/bench_index.py):
# on the retrieval benchmark's real clips it lifts µAP (comparability across queries)
# from 0.22 (raw cosine) to 0.45, where the z-score (cos - mean) / std reaches 0.38; on
# clustered vectors it keeps near-duplicates first (AP 1.0) where the z-score falls to 0.27.
CALIBRATION_PERCENTILE = 99.0


def calibration_reference(query: np.ndarray, background: np.ndarray) -> float:
    """t_q: the query's ``CALIBRATION_PERCENTILE``-th percentile cosine to the background
    sample (what "close" means around this query: in a dense region, everything is)."""
    if len(background) < 2:
        return 0.0
    sims = background @ normalise(np.asarray(query, dtype=np.float32).reshape(-1))  # (B,)
    return float(min(np.percentile(sims, CALIBRATION_PERCENTILE), 1.0 - 1e-6))


def calibrate(cosine: float | np.ndarray, reference: float) -> float | np.ndarray:
    """The calibrated score of cosines for a query whose reference is ``reference``."""
    return (cosine - reference) / (1.0 - reference)


# --------------------------------------------------------------------------- single file (format 1)


def build(*, keys: np.ndarray, vectors: np.ndarray, path: Path, dtype: str = "f16") -> BuiltIndex:
    """Builds a cosine HNSW index of ``vectors`` (N, D) keyed by ``keys`` (N,) and writes
    it atomically to one file at ``path`` (the first format; see ``build_version``)."""
    started = time.perf_counter()
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(keys) != len(vectors):
        raise ValueError(f"keys {keys.shape} and vectors {vectors.shape} do not match")
    dim = int(vectors.shape[1])
    index = Index(ndim=dim, metric="cos", dtype=dtype)
    if len(keys):
        index.add(keys, quantise_i8(vectors) if dtype == "i8" else vectors, log=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    index.save(str(tmp))
    _fsync(tmp)
    os.replace(tmp, path)
    built = BuiltIndex(
        path=path,
        sha256=sha256_of(path),
        size=len(keys),
        dim=dim,
        dtype=dtype,
        seconds=time.perf_counter() - started,
        bytes=path.stat().st_size,
    )
    logger.info("built index %s: %d vectors, dim %d, %.2fs", path, len(keys), dim, built.seconds)
    return built


class VectorIndex:
    """A read-only, memory-mapped single index file (the first format)."""

    def __init__(self, index: Index, path: Path) -> None:
        self._index = index
        self.path = path
        self.background = np.zeros((0, index.ndim), dtype=np.float32)

    @classmethod
    def view(cls, path: Path, *, sha256: str, dim: int) -> VectorIndex:
        """Verifies the checksum, then memory-maps the file (USearch ``view``)."""
        path = Path(path)
        if not path.is_file():
            raise IndexFileError(f"index file {path} is missing")
        actual = sha256_of(path)
        if actual != sha256:
            raise IndexFileError(f"index file {path} is corrupt (sha256 {actual[:12]} != {sha256[:12]})")
        index = Index.restore(str(path), view=True)
        if index is None or index.ndim != dim:
            raise IndexFileError(f"index file {path} does not hold {dim}-d vectors")
        return cls(index, path)

    def __len__(self) -> int:
        return len(self._index)

    def search(self, query: np.ndarray, k: int, *, exact: bool = False,
               vectors_of: VectorsOf | None = None) -> list[Hit]:  # fmt: skip
        """Top ``k`` by the file's own cosines (this format never re-ranks)."""
        if len(self._index) == 0 or k <= 0:
            return []
        query = np.asarray(query, dtype=np.float32)
        if self._index.dtype.name == "I8":
            query = quantise_i8(query)
        matches = self._index.search(query, min(k, len(self._index)), exact=exact)
        return [Hit(int(key), 1.0 - float(d)) for key, d in zip(matches.keys, matches.distances, strict=True)]


def open_version(path: Path, *, sha256: str, dim: int, params: dict[str, Any]) -> IndexVersionFiles | VectorIndex:
    """Opens an index version of either format (as recorded in ``IndexVersion.params``)."""
    if params.get("format") == FORMAT:
        return IndexVersionFiles.view(path, sha256=sha256, dim=dim)
    return VectorIndex.view(path, sha256=sha256, dim=dim)


# --------------------------------------------------------------------------- exact search and merging


def exact_search(keys: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int) -> list[Hit]:
    """Brute-force cosine search over L2-normalised ``vectors`` (N, D)."""
    if len(keys) == 0 or k <= 0:
        return []
    scores = vectors @ np.asarray(query, dtype=np.float32)  # (N,)
    top = np.argpartition(-scores, min(k, len(scores)) - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [Hit(int(keys[i]), float(scores[i])) for i in top]


def merge(*hit_lists: list[Hit], k: int) -> list[Hit]:
    """Best score per key across lists, top ``k`` (ties broken by key, so the merge of
    shards does not depend on their order)."""
    best: dict[int, float] = {}
    for hits in hit_lists:
        for hit in hits:
            if hit.score > best.get(hit.key, -np.inf):
                best[hit.key] = hit.score
    return [Hit(key, score) for key, score in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
