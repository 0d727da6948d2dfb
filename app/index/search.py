"""Searching the library: the active index version plus the embeddings added since it
was built, filtered to enabled library videos, with calibrated scores.

Each worker process keeps the version it serves open (memory-mapped) and re-reads which
version is active at most every ``settings.index_refresh_s``, so a rebuild on any
machine is picked up without a restart. Opening a new version (checksumming every file)
happens in one thread while the others keep serving the previous one; a version that
fails its checks is refused for the life of the process and the previous one keeps
serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.index import queries
from app.index.calibrate import background_sample, calibrate, calibration_reference
from app.index.hits import exact_search, merge
from app.index.transform import normalise
from app.index.version import IndexFileError, IndexVersionFiles
from app.models import Embedding, IndexVersion, ModelVersion

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    video_id: int
    uri: str
    score: float  # cosine similarity of the embeddings, 1.0 = same direction
    calibrated: float | None = None  # app.index.calibrate.calibrate: 1 identical, 0 the query's top 1%
    near_duplicate: bool = False  # calibrated >= settings.near_duplicate_threshold

    @property
    def cosine(self) -> float:
        return self.score


@dataclass(frozen=True)
class ActiveIndex:
    """What a worker needs of an IndexVersion row, detached from any session."""

    id: int
    model_version_id: int
    path: str
    sha256: str
    dim: int
    watermark: int

    @classmethod
    def of(cls, row: IndexVersion) -> ActiveIndex:
        return cls(row.id, row.model_version_id, row.path, row.sha256, row.dim, int(row.embedding_watermark))


@dataclass
class _Delta:
    """Embeddings newer than the index watermark, cached per process and topped up:
    L2-normalised rows in a buffer that grows by doubling (no re-stacking per search)."""

    model_id: int
    watermark: int
    dim: int
    last_id: int
    size: int = 0
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    vectors: np.ndarray | None = None

    def append(self, keys: list[int], vectors: np.ndarray, last_id: int) -> None:
        need = self.size + len(keys)
        if self.vectors is None or need > len(self.keys):
            capacity = max(64, 2 * need)
            grown_keys = np.zeros(capacity, dtype=np.int64)
            grown = np.zeros((capacity, self.dim), dtype=np.float32)
            if self.vectors is not None:
                grown_keys[: self.size] = self.keys[: self.size]
                grown[: self.size] = self.vectors[: self.size]
            self.keys, self.vectors = grown_keys, grown
        self.keys[self.size : need] = keys
        self.vectors[self.size : need] = normalise(vectors)
        self.size, self.last_id = need, last_id

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        # Slices of the current buffers: a later append writes past ``size`` or into new
        # buffers, so what a search holds never changes under it.
        if self.vectors is None:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return self.keys[: self.size], self.vectors[: self.size]


_lock = threading.Lock()  # guards the module state below (never held across I/O)
_open_lock = threading.Lock()  # one thread opens a new version at a time
_serving: tuple[ActiveIndex, IndexVersionFiles] | None = None
_refused: set[int] = set()
_active_rows: dict[int, tuple[float, ActiveIndex | None]] = {}  # model id -> (read at, row)
_generation = 0  # bumped by invalidate_cache: a read that began before it is not cached
_delta: _Delta | None = None


def vector_of(row: Embedding) -> np.ndarray:
    """The embedding stored in ``row``: float32 (D,)."""
    return np.frombuffer(row.vector, dtype=np.float32)


def invalidate_cache() -> None:
    """Forgets which version is active, so the next search re-reads it (after a switch
    made by this process)."""
    global _generation
    with _lock:
        _active_rows.clear()
        _generation += 1


def _active_row(*, session: Session, model: ModelVersion, refresh_s: float) -> ActiveIndex | None:
    """The index row to serve ``model`` with (``queries.version_to_serve``), read from
    the database at most every ``refresh_s`` seconds per process (it is read on every
    search otherwise)."""
    now = time.monotonic()
    with _lock:
        cached = _active_rows.get(model.id)
        generation = _generation
    if cached is not None and now - cached[0] < refresh_s:
        return cached[1]
    row = queries.version_to_serve(session=session, model_id=model.id)
    active = ActiveIndex.of(row) if row is not None else None
    with _lock:
        if generation == _generation:
            _active_rows[model.id] = (now, active)
    return active


def _serving_index(
    *, session: Session, model: ModelVersion, settings: Settings
) -> tuple[ActiveIndex | None, IndexVersionFiles | None]:
    """The version to search with: the active one once opened; meanwhile, or when it is
    refused, the one open now; with none open (a fresh process), the newest older
    version of the model that passes its checks."""
    global _serving
    active = _active_row(session=session, model=model, refresh_s=settings.index_refresh_s)
    if active is None:
        return None, None
    with _lock:
        current = _serving if _serving is not None and _serving[0].model_version_id == model.id else None
        refused = active.id in _refused
    if current is not None and (current[0].id == active.id or refused):
        return current
    # Someone must open a version. With something to serve meanwhile, do not wait for a
    # thread that is already opening it (checksumming a large version takes seconds).
    if not _open_lock.acquire(blocking=current is None):
        return current if current is not None else (None, None)
    try:
        with _lock:
            if _serving is not None and _serving[0].id == active.id:
                return _serving
        candidates = [active] if not refused else []
        if current is None:  # nothing to keep serving if the active version is refused
            older = queries.older_versions(
                session=session, model_id=model.id, below_id=active.id, limit=max(1, settings.index_keep_versions)
            )
            candidates += [ActiveIndex.of(row) for row in older if row.id not in _refused]
        for candidate in candidates:
            searcher = _open(candidate, settings)
            if searcher is not None:
                with _lock:
                    _serving = (candidate, searcher)
                return candidate, searcher
            if current is not None:
                return current
        return None, None
    finally:
        _open_lock.release()


def _open(version: ActiveIndex, settings: Settings) -> IndexVersionFiles | None:
    """Opens (checks, then memory-maps) a version, or refuses it for good (logged)."""
    try:
        searcher = IndexVersionFiles.view(Path(version.path), sha256=version.sha256, dim=version.dim)
    except (IndexFileError, OSError, ValueError) as exc:
        logger.error("refusing index version %d (%s): %s", version.id, version.path, exc)
        with _lock:
            _refused.add(version.id)
        return None
    rerank = settings.index_rerank
    searcher.configure(
        expansion_search=settings.index_expansion_search,
        rerank=rerank if rerank is not None and searcher.params.rerank > 0 else None,
    )
    logger.info("serving index version %d (%d vectors) from %s", version.id, len(searcher), version.path)
    return searcher


def _delta_vectors(*, session: Session, model: ModelVersion, watermark: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of ``model`` with ids above ``watermark`` (not in the index file)."""
    global _delta
    with _lock:
        if _delta is None or _delta.model_id != model.id or _delta.watermark != watermark:
            _delta = _Delta(model.id, watermark, model.dim, watermark)
        delta, since = _delta, _delta.last_id
    rows = queries.embeddings_after(session=session, model_id=model.id, after_id=since)
    with _lock:
        fresh = [r for r in rows if r[0] > delta.last_id]  # another thread may have added some
        if fresh:
            vectors = np.stack([np.frombuffer(r[2], dtype=np.float32) for r in fresh])
            delta.append([r[1] for r in fresh], vectors, fresh[-1][0])
        return delta.view()


def search_library(
    *,
    session: Session,
    model: ModelVersion,
    query: np.ndarray,
    k: int,
    exclude: set[int],
    collection: str | None = None,
    exclude_near_duplicates: bool = False,
    settings: Settings | None = None,
) -> tuple[list[Match], int | None]:
    """Top ``k`` enabled library videos most similar to ``query`` (cosine), never those in
    ``exclude`` (nor, with ``exclude_near_duplicates``, those flagged as near-duplicates
    of the query), only from ``collection`` when given. Returns the matches, each with
    its cosine, calibrated score and near-duplicate flag, and the index version used
    (None: exact search only)."""
    settings = settings or get_settings()
    q = normalise(np.asarray(query, dtype=np.float32).reshape(-1))
    active, searcher = _serving_index(session=session, model=model, settings=settings)
    watermark = active.watermark if active is not None else 0
    delta_keys, delta_vecs = _delta_vectors(session=session, model=model, watermark=watermark)
    background = background_sample(searcher.background if searcher is not None else None, delta_vecs)
    reference = calibration_reference(q, background)
    want = k + len(exclude)
    matches: list[Match] = []

    def vectors_of(ids: np.ndarray) -> np.ndarray:
        return queries.stored_vectors(session=session, model_id=model.id, dim=model.dim, video_ids=ids)

    for widen in (4, 16, 64):
        fetch = want * widen
        hits = merge(
            searcher.search(q, fetch, vectors_of=vectors_of) if searcher is not None else [],
            exact_search(delta_keys, delta_vecs, q, fetch),
            k=fetch,
        )
        candidates = [h.key for h in hits if h.key not in exclude]
        allowed = queries.eligible_videos(session=session, video_ids=candidates, collection=collection)
        matches = []
        for h in hits:
            if h.key not in allowed:
                continue
            calibrated = float(calibrate(h.score, reference))
            near = calibrated >= settings.near_duplicate_threshold
            if near and exclude_near_duplicates:
                continue
            matches.append(Match(h.key, allowed[h.key], h.score, calibrated, near))
        searched_all = len(hits) < fetch
        if len(matches) >= k or searched_all:
            break
    return matches[:k], (active.id if active is not None else None)
