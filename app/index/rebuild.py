"""Rebuilding the library's index from the database: the embeddings of a model's
enabled library videos read into a new version (``app.index.build``) that becomes active; the periodic refresh
that does so when enough embeddings are newer than the active build; the files of old
versions removed. Rebuilds never overlap (a database lock held until the caller
commits), and searches keep using the previous version until the new row is committed.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from app.config import Settings
from app.index import queries
from app.index.build import build_version
from app.index.frames import Frames
from app.index.params import IndexParams, index_params
from app.index.search import invalidate_cache
from app.index.version import MANIFEST, FramesOf
from app.models import IndexVersion, ModelVersion

logger = logging.getLogger(__name__)


class RebuildBusy(RuntimeError):
    """Another rebuild holds the lock."""


def rebuild_index(
    *,
    session: Session,
    model: ModelVersion,
    settings: Settings,
    dtype: str | None = None,
    params: IndexParams | None = None,
) -> IndexVersion:
    """Builds a new index version from the embeddings of ``model``'s enabled library
    videos and makes it active (``params``, else the settings; ``dtype`` overrides the
    storage). Never runs twice
    at once (a database lock held until the caller commits); searches keep using the old
    version until the new row is committed. Deletes the files of versions older than
    the newest ``settings.index_keep_versions``."""
    _take_rebuild_lock(session=session)
    started = time.perf_counter()
    params = params or index_params(settings, dtype=dtype)
    # The horizon is read before the embeddings: whatever is stamped below it was
    # committed by then, so the read below holds it; the rest is searched beside the file.
    horizon = queries.snapshot_horizon(session=session, model_id=model.id)
    watermark = queries.embedding_watermark(session=session, model_id=model.id)
    keys, vectors, fresh = queries.library_embeddings(session=session, model_id=model.id, dim=model.dim,
                                                      horizon=horizon)  # fmt: skip
    loaded = time.perf_counter() - started
    if session.get_bind().dialect.name == "postgresql":
        _analyse(session)
    directory = settings.index_dir / f"model{model.id}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    # The second stage's frames copied into the version (settings.index_frames_file).
    frames_of: FramesOf | None = (
        functools.partial(_stored_frames, session=session, model_id=model.id) if settings.index_frames_file else None
    )
    built = build_version(keys=keys, vectors=vectors, directory=directory, params=params, frames_of=frames_of)
    queries.deactivate_versions(session=session)
    version = IndexVersion(
        model_version_id=model.id,
        path=str(built.path),
        sha256=built.sha256,
        size=built.size,
        dim=built.dim,
        dtype=built.dtype,
        embedding_watermark=watermark,
        horizon=horizon,
        build_seconds=time.perf_counter() - started,
        params={**built.params, "bytes": built.bytes, "load_s": round(loaded, 3), "fresh_in_file": fresh},
        is_active=True,
    )
    session.add(version)
    session.flush()
    # This process notices its own switch at once (others within index_refresh_s).
    event.listen(session, "after_commit", lambda _session: invalidate_cache(), once=True)
    _remove_old_versions(session=session, settings=settings)
    logger.info("index version %d: %d vectors, %s, %.1fs", version.id, len(keys), built.dtype, version.build_seconds)
    return version


def _analyse(session: Session) -> None:
    """A rebuild follows the library's bulk changes: every search's statements are then
    planned with the statistics of the library it indexes, whether or not autovacuum runs
    (at 100k videos loaded and not analysed, the fresh-embeddings read was planned as a
    scan of every video: 189 ms a search, against 0.04 after). On a connection of its own,
    committed at once: in the rebuild's transaction its lock would keep autovacuum off
    both tables until the build is done."""
    with session.get_bind().engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE videos, embeddings"))


def _stored_frames(video_ids: np.ndarray, *, session: Session, model_id: int) -> dict[int, Frames]:
    return queries.stored_frames(session=session, model_id=model_id, video_ids=video_ids.tolist())


def refresh_index(*, session: Session, model: ModelVersion, settings: Settings) -> IndexVersion | None:
    """The periodic rebuild: a new version when at least ``index_rebuild_min_new``
    embeddings are newer than the active build (or there is none yet and anything to
    index), else None. Raises RebuildBusy when another rebuild holds the lock."""
    version, newer = queries.embeddings_since_index(session=session, model=model)
    if newer == 0 or (version is not None and newer < settings.index_rebuild_min_new):
        return None
    return rebuild_index(session=session, model=model, settings=settings)


def _remove_old_versions(*, session: Session, settings: Settings) -> None:
    """Deletes the files (not the rows: they are history) of all but the newest
    ``index_keep_versions`` versions, and leftovers of builds that died. A worker still
    serving a deleted version keeps its memory maps (POSIX keeps unlinked files alive)."""
    root = settings.index_dir.resolve()
    rows = queries.version_paths(session=session)
    keep = {Path(path).resolve() for _, path in rows[: max(1, settings.index_keep_versions)]}
    for _, path in rows[max(1, settings.index_keep_versions) :]:
        target = Path(path).resolve()
        if target.name == MANIFEST:
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


def _take_rebuild_lock(*, session: Session) -> None:
    """Takes the lock for this transaction (Postgres: an advisory lock released at
    commit or rollback), or raises RebuildBusy."""
    if session.get_bind().dialect.name == "postgresql":
        got = session.scalar(text("SELECT pg_try_advisory_xact_lock(724101)"))
        if not got:
            raise RebuildBusy("another index rebuild is running")
    # SQLite (embedded, one machine) serialises writers itself.
