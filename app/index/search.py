"""Searching the library: the active index version plus the embeddings added since it
was built, filtered to enabled library videos, with calibrated scores. Also rebuilding
that index.

Each worker process keeps the version it serves open (memory-mapped) and re-reads which
version is active at most every ``settings.index_refresh_s``, so a rebuild on any
machine is picked up without a restart. Opening a new version (checksumming every file)
happens in one thread while the others keep serving the previous one; a version that
fails its checks is refused for the life of the process and the previous one keeps
serving.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import event, func, select, text, update
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.index import version as vindex
from app.models import Embedding, IndexVersion, ModelVersion, Video

logger = logging.getLogger(__name__)

# Library vectors sampled for calibration when no index version is served yet.
_BACKGROUND = 1000
# Ids bound in one SQLite query (it takes at most 32,766 parameters).
_IDS_PER_READ = 10_000


class RebuildBusy(RuntimeError):
    """Another rebuild holds the lock."""


@dataclass(frozen=True)
class Match:
    video_id: int
    uri: str
    score: float  # cosine similarity of the embeddings, 1.0 = same direction
    calibrated: float | None = None  # app.index.version.calibrate: 1 identical, 0 the query's top 1%
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
    params: dict[str, Any]

    @classmethod
    def of(cls, row: IndexVersion) -> ActiveIndex:
        return cls(row.id, row.model_version_id, row.path, row.sha256, row.dim, int(row.embedding_watermark),
                   dict(row.params or {}))  # fmt: skip


Searcher = vindex.IndexVersionFiles | vindex.VectorIndex


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
        self.vectors[self.size : need] = vindex.normalise(vectors)
        self.size, self.last_id = need, last_id

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        # Slices of the current buffers: a later append writes past ``size`` or into new
        # buffers, so what a search holds never changes under it.
        if self.vectors is None:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return self.keys[: self.size], self.vectors[: self.size]


_lock = threading.Lock()  # guards the module state below (never held across I/O)
_open_lock = threading.Lock()  # one thread opens a new version at a time
_serving: tuple[ActiveIndex, Searcher] | None = None
_refused: set[int] = set()
_active_rows: dict[int, tuple[float, ActiveIndex | None]] = {}  # model id -> (read at, row)
_generation = 0  # bumped by invalidate_cache: a read that began before it is not cached
_delta: _Delta | None = None


def vector_of(row: Embedding) -> np.ndarray:
    return np.frombuffer(row.vector, dtype=np.float32)


def stored_vectors(session: Session, model_id: int, dim: int, video_ids: np.ndarray) -> np.ndarray:
    """The stored embeddings of ``video_ids`` under model ``model_id``: float32
    (len(video_ids), dim) in that order, NaN rows for videos without one (what an index
    that re-ranks from the database reads, ``app.index.version.VectorsOf``)."""
    out = np.full((len(video_ids), dim), np.nan, dtype=np.float32)
    row_of = {int(v): i for i, v in enumerate(video_ids)}
    ids = list(row_of)
    if not ids:
        return out
    if session.get_bind().dialect.name == "postgresql":
        # One array parameter, results in binary: bytea as raw bytes rather than hex text
        # (100 rows of 2 KB measured 1.6 ms against 2.7 ms through the text protocol).
        cursor = session.connection().connection.driver_connection.cursor(binary=True)  # type: ignore[union-attr]
        found = cursor.execute(
            "SELECT video_id, vector FROM embeddings WHERE model_version_id = %s AND video_id = ANY(%s)",
            (model_id, ids),
        ).fetchall()
    else:
        found = []
        for start in range(0, len(ids), _IDS_PER_READ):
            found += session.execute(
                select(Embedding.video_id, Embedding.vector).where(
                    Embedding.model_version_id == model_id, Embedding.video_id.in_(ids[start : start + _IDS_PER_READ])
                )
            ).all()
    for video_id, vector in found:
        out[row_of[video_id]] = np.frombuffer(vector, dtype=np.float32)
    return out


def invalidate_cache() -> None:
    """Forgets which version is active, so the next search re-reads it (after a switch
    made by this process)."""
    global _generation
    with _lock:
        _active_rows.clear()
        _generation += 1


def _active_row(session: Session, model: ModelVersion, refresh_s: float) -> ActiveIndex | None:
    """The index row to serve ``model`` with, read from the database at most every
    ``refresh_s`` seconds per process (it is read on every search otherwise): the active
    one, else the model's newest. (One index is active across all models: building one
    for a warming model deactivates the serving model's, which must not fall back to an
    exact scan of every embedding.)"""
    now = time.monotonic()
    with _lock:
        cached = _active_rows.get(model.id)
        generation = _generation
    if cached is not None and now - cached[0] < refresh_s:
        return cached[1]
    row = session.scalar(
        select(IndexVersion)
        .where(IndexVersion.model_version_id == model.id)
        .order_by(IndexVersion.is_active.desc(), IndexVersion.id.desc())
        .limit(1)
    )
    active = ActiveIndex.of(row) if row is not None else None
    with _lock:
        if generation == _generation:
            _active_rows[model.id] = (now, active)
    return active


def _serving_index(
    session: Session, model: ModelVersion, settings: Settings
) -> tuple[ActiveIndex | None, Searcher | None]:
    """The version to search with: the active one once opened; meanwhile, or when it is
    refused, the one open now; with none open (a fresh process), the newest older
    version of the model that passes its checks."""
    global _serving
    active = _active_row(session, model, settings.index_refresh_s)
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
            older = session.scalars(
                select(IndexVersion)
                .where(IndexVersion.model_version_id == model.id, IndexVersion.id < active.id)
                .order_by(IndexVersion.id.desc())
                .limit(max(1, settings.index_keep_versions))
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


def _open(version: ActiveIndex, settings: Settings) -> Searcher | None:
    """Opens (checks, then memory-maps) a version, or refuses it for good (logged)."""
    try:
        searcher = vindex.open_version(Path(version.path), sha256=version.sha256, dim=version.dim,
                                       params=version.params)  # fmt: skip
    except (vindex.IndexFileError, OSError, ValueError) as exc:
        logger.error("refusing index version %d (%s): %s", version.id, version.path, exc)
        with _lock:
            _refused.add(version.id)
        return None
    if isinstance(searcher, vindex.IndexVersionFiles):
        rerank = settings.index_rerank
        searcher.configure(
            expansion_search=settings.index_expansion_search,
            rerank=rerank if rerank is not None and searcher.params.rerank > 0 else None,
        )
    logger.info("serving index version %d (%d vectors) from %s", version.id, len(searcher), version.path)
    return searcher


def _delta_vectors(session: Session, model: ModelVersion, watermark: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of ``model`` with ids above ``watermark`` (not in the index file)."""
    global _delta
    with _lock:
        if _delta is None or _delta.model_id != model.id or _delta.watermark != watermark:
            _delta = _Delta(model.id, watermark, model.dim, watermark)
        delta, since = _delta, _delta.last_id
    rows = session.execute(
        select(Embedding.id, Embedding.video_id, Embedding.vector)
        .where(Embedding.model_version_id == model.id, Embedding.id > since)
        .order_by(Embedding.id)
    ).all()
    with _lock:
        fresh = [r for r in rows if r[0] > delta.last_id]  # another thread may have added some
        if fresh:
            vectors = np.stack([np.frombuffer(r[2], dtype=np.float32) for r in fresh])
            delta.append([r[1] for r in fresh], vectors, fresh[-1][0])
        return delta.view()


def _background(searcher: Searcher | None, delta_vectors: np.ndarray) -> np.ndarray:
    background = getattr(searcher, "background", None)
    if background is not None and len(background) >= 2:
        return background
    if len(delta_vectors) <= _BACKGROUND:
        return delta_vectors
    rows = np.random.default_rng(0).choice(len(delta_vectors), _BACKGROUND, replace=False)
    return delta_vectors[np.sort(rows)]


def search_library(
    session: Session,
    model: ModelVersion,
    query: np.ndarray,
    *,
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
    q = vindex.normalise(np.asarray(query, dtype=np.float32).reshape(-1))
    active, searcher = _serving_index(session, model, settings)
    delta_keys, delta_vecs = _delta_vectors(session, model, active.watermark if active is not None else 0)
    reference = vindex.calibration_reference(q, _background(searcher, delta_vecs))
    want = k + len(exclude)
    matches: list[Match] = []

    def vectors_of(ids: np.ndarray) -> np.ndarray:
        return stored_vectors(session, model.id, model.dim, ids)

    for widen in (4, 16, 64):
        fetch = want * widen
        hits = vindex.merge(
            searcher.search(q, fetch, vectors_of=vectors_of) if searcher is not None else [],
            vindex.exact_search(delta_keys, delta_vecs, q, fetch),
            k=fetch,
        )
        allowed = _eligible(session, [h.key for h in hits if h.key not in exclude], collection)
        matches = []
        for h in hits:
            if h.key not in allowed:
                continue
            calibrated = float(vindex.calibrate(h.score, reference))
            near = calibrated >= settings.near_duplicate_threshold
            if near and exclude_near_duplicates:
                continue
            matches.append(Match(h.key, allowed[h.key], h.score, calibrated, near))
        searched_all = len(hits) < fetch
        if len(matches) >= k or searched_all:
            break
    return matches[:k], (active.id if active is not None else None)


def _eligible(session: Session, ids: list[int], collection: str | None) -> dict[int, str]:
    if not ids:
        return {}
    stmt = select(Video.id, Video.uri).where(Video.id.in_(ids), Video.in_library, Video.enabled)
    if collection is not None:
        stmt = stmt.where(Video.collection == collection)
    return {video_id: uri for video_id, uri in session.execute(stmt)}


def index_params(settings: Settings, *, dtype: str | None = None) -> vindex.IndexParams:
    """The build parameters the settings ask for (``dtype`` overrides index_dtype)."""
    reduced = settings.pca_dim is not None
    rerank = settings.index_rerank
    if rerank is None:
        rerank = 100 if settings.index_mode == "hash" or reduced else 0
    return vindex.IndexParams(
        mode=settings.index_mode,
        dtype=dtype or settings.index_dtype,  # type: ignore[arg-type]
        connectivity=settings.index_connectivity,
        expansion_add=settings.index_expansion_add,
        expansion_search=settings.index_expansion_search,
        shards=settings.index_shards,
        pca_dim=settings.pca_dim,
        pca_whiten=settings.pca_whiten,
        hash_bits=settings.hash_bits,
        hash_rotation=settings.hash_rotation,
        rerank=rerank,
        rerank_from=settings.index_rerank_from,
        rerank_dtype=settings.index_rerank_dtype,
    )


def rebuild_index(
    session: Session,
    model: ModelVersion,
    *,
    settings: Settings,
    dtype: str | None = None,
    params: vindex.IndexParams | None = None,
) -> IndexVersion:
    """Builds a new index version from every embedding of ``model`` and makes it active
    (``params``, else the settings; ``dtype`` overrides the storage). Never runs twice
    at once (a database lock held until the caller commits); searches keep using the old
    version until the new row is committed. Deletes the files of versions older than
    the newest ``settings.index_keep_versions``."""
    _take_rebuild_lock(session)
    started = time.perf_counter()
    params = params or index_params(settings, dtype=dtype)
    watermark = int(
        session.scalar(select(func.coalesce(func.max(Embedding.id), 0)).where(Embedding.model_version_id == model.id))
        or 0
    )
    where = (Embedding.model_version_id == model.id, Embedding.id <= watermark)
    count = session.scalar(select(func.count()).select_from(Embedding).where(*where)) or 0
    keys = np.zeros(count, dtype=np.uint64)
    vectors = np.zeros((count, model.dim), dtype=np.float32)  # (N, D), filled as rows stream in
    n = 0
    stream = session.execute(
        select(Embedding.video_id, Embedding.vector).where(*where).order_by(Embedding.id),
        execution_options={"yield_per": 10_000},
    )
    for video_id, blob in stream:
        if n == count:  # rows committed meanwhile below the watermark cannot exist; be safe
            break
        keys[n], vectors[n] = video_id, np.frombuffer(blob, dtype=np.float32)
        n += 1
    keys, vectors = keys[:n], vectors[:n]
    loaded = time.perf_counter() - started
    directory = settings.index_dir / f"model{model.id}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    built = vindex.build_version(keys=keys, vectors=vectors, directory=directory, params=params)
    session.execute(update(IndexVersion).where(IndexVersion.is_active).values(is_active=False))
    session.flush()
    version = IndexVersion(
        model_version_id=model.id,
        path=str(built.path),
        sha256=built.sha256,
        size=built.size,
        dim=built.dim,
        dtype=built.dtype,
        embedding_watermark=watermark,
        build_seconds=time.perf_counter() - started,
        params={**built.params, "bytes": built.bytes, "load_s": round(loaded, 3)},
        is_active=True,
    )
    session.add(version)
    session.flush()
    # This process notices its own switch at once (others within index_refresh_s).
    event.listen(session, "after_commit", lambda _session: invalidate_cache(), once=True)
    _remove_old_versions(session, settings)
    logger.info("index version %d: %d vectors, %s, %.1fs", version.id, n, built.dtype, version.build_seconds)
    return version


def embeddings_since_index(session: Session, model: ModelVersion) -> tuple[IndexVersion | None, int]:
    """The model's active index version (None: never built) and how many of its
    embeddings are newer than that build (searched exactly until the next one)."""
    version = session.scalar(
        select(IndexVersion).where(IndexVersion.is_active, IndexVersion.model_version_id == model.id)
    )
    watermark = version.embedding_watermark if version is not None else 0
    newer = session.scalar(select(func.count()).where(Embedding.model_version_id == model.id, Embedding.id > watermark))
    return version, int(newer or 0)


def refresh_index(session: Session, model: ModelVersion, *, settings: Settings) -> IndexVersion | None:
    """The periodic rebuild: a new version when at least ``index_rebuild_min_new``
    embeddings are newer than the active build (or there is none yet and anything to
    index), else None. Raises RebuildBusy when another rebuild holds the lock."""
    version, newer = embeddings_since_index(session, model)
    if newer == 0 or (version is not None and newer < settings.index_rebuild_min_new):
        return None
    return rebuild_index(session, model, settings=settings)


def _remove_old_versions(session: Session, settings: Settings) -> None:
    """Deletes the files (not the rows: they are history) of all but the newest
    ``index_keep_versions`` versions, and leftovers of builds that died. A worker still
    serving a deleted version keeps its memory maps (POSIX keeps unlinked files alive)."""
    root = settings.index_dir.resolve()
    rows = session.execute(select(IndexVersion.id, IndexVersion.path).order_by(IndexVersion.id.desc())).all()
    keep = {Path(path).resolve() for _, path in rows[: max(1, settings.index_keep_versions)]}
    for _, path in rows[max(1, settings.index_keep_versions) :]:
        target = Path(path).resolve()
        if target.name == vindex.MANIFEST:
            target = target.parent
        if root not in target.parents or any(target == k or target in k.parents for k in keep):
            continue
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    stale = time.time() - 3600
    for leftover in root.glob("*.tmp") if root.is_dir() else []:
        if leftover.stat().st_mtime >= stale:
            continue  # perhaps a build in progress
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _take_rebuild_lock(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        got = session.scalar(text("SELECT pg_try_advisory_xact_lock(724101)"))
        if not got:
            raise RebuildBusy("another index rebuild is running")
    # SQLite (embedded, one machine) serialises writers itself.
