"""Vector index over USearch: build a file, open it memory-mapped, search it.

The index is a derived cache of the embeddings in the database: built for one model
version, written under a temporary name, checksummed, then renamed into place. A file
whose checksum does not match is refused before USearch ever reads it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from usearch.index import Index

logger = logging.getLogger(__name__)


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


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build(
    *, keys: np.ndarray, vectors: np.ndarray, path: Path, dtype: str = "f16"
) -> BuiltIndex:
    """Builds a cosine HNSW index of ``vectors`` (N, D) keyed by ``keys`` (N,) and writes
    it atomically to ``path``."""
    started = time.perf_counter()
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(keys) != len(vectors):
        raise ValueError(f"keys {keys.shape} and vectors {vectors.shape} do not match")
    dim = int(vectors.shape[1])
    index = Index(ndim=dim, metric="cos", dtype=dtype)
    if len(keys):
        # One batch call: USearch reserves capacity up front (growing concurrently can
        # strand nodes, usearch#735).
        index.add(keys, vectors, log=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    index.save(str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    built = BuiltIndex(
        path=path,
        sha256=sha256_of(path),
        size=len(keys),
        dim=dim,
        dtype=dtype,
        seconds=time.perf_counter() - started,
    )
    logger.info("built index %s: %d vectors, dim %d, %.2fs", path, len(keys), dim, built.seconds)
    return built


class VectorIndex:
    """A read-only, memory-mapped index file."""

    def __init__(self, index: Index, path: Path) -> None:
        self._index = index
        self.path = path

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

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        if len(self._index) == 0 or k <= 0:
            return []
        matches = self._index.search(np.asarray(query, dtype=np.float32), min(k, len(self._index)))
        return [Hit(int(key), 1.0 - float(d)) for key, d in zip(matches.keys, matches.distances, strict=True)]


def exact_search(keys: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int) -> list[Hit]:
    """Brute-force cosine search over L2-normalised ``vectors`` (N, D)."""
    if len(keys) == 0 or k <= 0:
        return []
    scores = vectors @ np.asarray(query, dtype=np.float32)  # (N,)
    top = np.argpartition(-scores, min(k, len(scores)) - 1)[:k]
    top = top[np.argsort(-scores[top])]
    return [Hit(int(keys[i]), float(scores[i])) for i in top]


def merge(*hit_lists: list[Hit], k: int) -> list[Hit]:
    """Best score per key across lists, top ``k``."""
    best: dict[int, float] = {}
    for hits in hit_lists:
        for hit in hits:
            if hit.score > best.get(hit.key, -2.0):
                best[hit.key] = hit.score
    return [Hit(key, score) for key, score in sorted(best.items(), key=lambda kv: -kv[1])[:k]]
