"""Searching the library: the active index file plus the embeddings added since it was
built, filtered to enabled library videos. Also rebuilding that index."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app import index as vindex
from app.config import Settings
from app.models import Embedding, IndexVersion, ModelVersion, Video

logger = logging.getLogger(__name__)


class RebuildBusy(RuntimeError):
    """Another rebuild holds the lock."""


@dataclass
class _Delta:
    """Embeddings newer than the index watermark, cached per process and topped up."""

    model_id: int
    watermark: int
    last_id: int
    keys: list[int] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)


_lock = threading.Lock()
_open_index: tuple[int, vindex.VectorIndex] | None = None
_delta: _Delta | None = None


def vector_of(row: Embedding) -> np.ndarray:
    return np.frombuffer(row.vector, dtype=np.float32)


def _active_index(session: Session, model: ModelVersion) -> tuple[IndexVersion | None, vindex.VectorIndex | None]:
    """The active index row and its memory-mapped file, reopened when the row changes.
    A file that fails its checksum is refused and the previously opened one keeps serving."""
    global _open_index
    row = session.scalar(
        select(IndexVersion).where(IndexVersion.is_active, IndexVersion.model_version_id == model.id)
    )
    if row is None:
        return None, None
    with _lock:
        if _open_index is not None and _open_index[0] == row.id:
            return row, _open_index[1]
        try:
            opened = vindex.VectorIndex.view(Path(row.path), sha256=row.sha256, dim=row.dim)
        except vindex.IndexFileError as exc:
            logger.error("refusing index version %d: %s", row.id, exc)
            if _open_index is not None:
                old = session.get(IndexVersion, _open_index[0])
                return old, _open_index[1]
            return None, None
        _open_index = (row.id, opened)
        logger.info("serving index version %d (%d vectors)", row.id, len(opened))
        return row, opened


def _delta_vectors(session: Session, model: ModelVersion, watermark: int) -> tuple[np.ndarray, np.ndarray]:
    global _delta
    with _lock:
        if _delta is None or _delta.model_id != model.id or _delta.watermark != watermark:
            _delta = _Delta(model.id, watermark, watermark)
        rows = session.execute(
            select(Embedding.id, Embedding.video_id, Embedding.vector)
            .where(Embedding.model_version_id == model.id, Embedding.id > _delta.last_id)
            .order_by(Embedding.id)
        ).all()
        for emb_id, video_id, blob in rows:
            _delta.keys.append(video_id)
            _delta.vectors.append(np.frombuffer(blob, dtype=np.float32))
            _delta.last_id = emb_id
        if not _delta.keys:
            return np.zeros(0, dtype=np.int64), np.zeros((0, model.dim), dtype=np.float32)
        return np.asarray(_delta.keys), np.stack(_delta.vectors)


@dataclass(frozen=True)
class Match:
    video_id: int
    uri: str
    score: float


def search_library(
    session: Session,
    model: ModelVersion,
    query: np.ndarray,
    *,
    k: int,
    exclude: set[int],
    collection: str | None = None,
) -> tuple[list[Match], int | None]:
    """Top ``k`` enabled library videos most similar to ``query`` (cosine), never those in
    ``exclude``. Returns the matches and the index version used (None: exact only)."""
    row, opened = _active_index(session, model)
    watermark = row.embedding_watermark if row is not None else 0
    delta_keys, delta_vecs = _delta_vectors(session, model, watermark)
    want = k + len(exclude)
    for widen in (4, 16, 64):
        fetch = want * widen
        hits = vindex.merge(
            opened.search(query, fetch) if opened is not None else [],
            vindex.exact_search(delta_keys, delta_vecs, query, fetch),
            k=fetch,
        )
        allowed = _eligible(session, [h.key for h in hits if h.key not in exclude], collection)
        matches = [Match(h.key, allowed[h.key], h.score) for h in hits if h.key in allowed]
        searched_all = len(hits) < fetch
        if len(matches) >= k or searched_all:
            return matches[:k], (row.id if row is not None else None)
    return matches[:k], (row.id if row is not None else None)


def _eligible(session: Session, ids: list[int], collection: str | None) -> dict[int, str]:
    if not ids:
        return {}
    stmt = select(Video.id, Video.uri).where(Video.id.in_(ids), Video.in_library, Video.enabled)
    if collection is not None:
        stmt = stmt.where(Video.collection == collection)
    return {video_id: uri for video_id, uri in session.execute(stmt)}


def rebuild_index(session: Session, model: ModelVersion, *, settings: Settings, dtype: str = "f16") -> IndexVersion:
    """Builds a new index file from every embedding of ``model`` and makes it active.
    Never runs twice at once (a database lock); searches keep using the old file until
    the new row is committed."""
    _take_rebuild_lock(session)
    started = time.perf_counter()
    watermark = session.scalar(
        select(func.coalesce(func.max(Embedding.id), 0)).where(Embedding.model_version_id == model.id)
    )
    rows = session.execute(
        select(Embedding.video_id, Embedding.vector)
        .join(Video, Video.id == Embedding.video_id)
        .where(Embedding.model_version_id == model.id, Embedding.id <= watermark)
        .order_by(Embedding.id)
    ).all()
    keys = np.asarray([r[0] for r in rows], dtype=np.uint64)
    vectors = (
        np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
        if rows
        else np.zeros((0, model.dim), dtype=np.float32)
    )
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = settings.index_dir / f"model{model.id}-{stamp}-{time.time_ns() % 10**9}.usearch"
    built = vindex.build(keys=keys, vectors=vectors, path=path, dtype=dtype)
    session.execute(update(IndexVersion).where(IndexVersion.is_active).values(is_active=False))
    session.flush()
    version = IndexVersion(
        model_version_id=model.id,
        path=str(built.path),
        sha256=built.sha256,
        size=built.size,
        dim=built.dim,
        dtype=dtype,
        embedding_watermark=int(watermark or 0),
        build_seconds=time.perf_counter() - started,
        is_active=True,
    )
    session.add(version)
    session.flush()
    return version


def _take_rebuild_lock(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        got = session.scalar(text("SELECT pg_try_advisory_xact_lock(724101)"))
        if not got:
            raise RebuildBusy("another index rebuild is running")
    # SQLite (embedded, one machine) serialises writers itself.
