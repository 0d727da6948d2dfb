"""Searching the library: the active index version plus the embeddings it may lack (added,
or added to the library, since its build read), filtered to enabled library videos, with
calibrated scores. Small collections are searched exactly.

Each worker process keeps the version it serves open (memory-mapped) and re-reads which
version is active at most every ``settings.index_refresh_s``, so a rebuild on any
machine is picked up without a restart. Opening a new version (checksumming every file)
happens in one thread while the others keep serving the previous one; a version that
fails its checks is refused for the life of the process and the previous one keeps
serving.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.index import queries
from app.index.calibrate import background_sample, calibrate, calibration_reference
from app.index.frames import BACKGROUND_VIDEOS, Background, Frames
from app.index.hits import Hit, exact_search, merge
from app.index.mirrors import Mirrors
from app.index.rerank import rerank
from app.index.transform import normalise
from app.index.version import IndexFileError, IndexVersionFiles
from app.models import Embedding, IndexVersion, ModelVersion

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    video_id: int
    uri: str
    score: float  # cosine similarity of the embeddings, 1.0 = same direction
    # Comparable across queries: the frame-alignment score where the second stage ran
    # (``match``), else the cosine calibrated by app.index.calibrate (1 identical, 0 the
    # query's top 1%).
    calibrated: float | None = None
    near_duplicate: bool = False  # calibrated >= its threshold (settings)
    match: float | None = None  # app.index.align: the frame-alignment score
    query_span: tuple[float, float] | None = None  # seconds of the query that match
    span: tuple[float, float] | None = None  # ... and of this video

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
    horizon: int  # embeddings stamped at or above it are searched beside the file

    @classmethod
    def of(cls, row: IndexVersion) -> ActiveIndex:
        return cls(row.id, row.model_version_id, row.path, row.sha256, row.dim, int(row.horizon))


@dataclass
class _Delta:
    """The fresh embeddings searched beside an index version (``queries.fresh_embeddings``),
    cached per process and topped up on each search: one L2-normalised row per video in
    buffers that grow by doubling (no re-stacking per search).

    Each read takes what is stamped at or above ``horizon`` and, when it finds any, moves
    ``horizon`` to the read's own. Rows stamped at or above the new horizon (committed
    while an older transaction was still open) are read again next time: their videos
    are sent as ``held`` so their bytes are not, and a row seen twice is kept once."""

    model_id: int
    start: int  # the version's horizon, where this delta begins
    dim: int
    horizon: int
    size: int = 0
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    vectors: np.ndarray | None = None
    present: set[int] = field(default_factory=set)  # the videos in the buffers
    window: dict[int, int] = field(default_factory=dict)  # video id -> stamp, where stamp >= horizon

    def add(self, rows: list[tuple[int, int, bytes]], horizon: int | None) -> None:
        new = [(video_id, blob) for video_id, _, blob in rows if video_id not in self.present]
        need = self.size + len(new)
        if new and (self.vectors is None or need > len(self.keys)):
            capacity = max(64, 2 * need)
            grown_keys = np.zeros(capacity, dtype=np.int64)
            grown = np.zeros((capacity, self.dim), dtype=np.float32)
            if self.vectors is not None:
                grown_keys[: self.size] = self.keys[: self.size]
                grown[: self.size] = self.vectors[: self.size]
            self.keys, self.vectors = grown_keys, grown
        if new:
            assert self.vectors is not None
            self.keys[self.size : need] = [video_id for video_id, _ in new]
            self.vectors[self.size : need] = normalise(np.stack([np.frombuffer(b, dtype=np.float32) for _, b in new]))
            self.present.update(video_id for video_id, _ in new)
            self.size = need
        self.window.update((video_id, stamp) for video_id, stamp, _ in rows)
        if horizon is not None and horizon > self.horizon:
            self.horizon = horizon
            self.window = {video_id: stamp for video_id, stamp in self.window.items() if stamp >= horizon}

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


def _delta_vectors(*, session: Session, model: ModelVersion, since: int) -> tuple[np.ndarray, np.ndarray]:
    """The fresh embeddings of ``model`` beside a version built at horizon ``since``: video
    ids (N,) and L2-normalised vectors (N, D). One statement per search."""
    global _delta
    with _lock:
        if _delta is None or _delta.model_id != model.id or _delta.start != since:
            _delta = _Delta(model.id, since, model.dim, since)
        delta, read_from, held = _delta, _delta.horizon, sorted(_delta.window)
    rows, horizon = queries.fresh_embeddings(session=session, model_id=model.id, since=read_from, held=held)
    with _lock:
        delta.add(rows, horizon)  # (another thread may have added some of them meanwhile)
        return delta.view()


# A collection the index search does not fill at its first width is searched exactly
# when it holds at most this many videos: reading their vectors (~2 KB each, one
# statement) costs about what widening the index search would, and widening misses them.
EXACT_COLLECTION = 256
_EXACT_CHUNK = 10_000  # vectors read at a time when a large collection is searched exactly
_WIDTHS = (4.0, 16.0, 64.0)  # candidates looked at: (k + excluded) times each, until k qualify
# The second stage asks for many candidates (settings.rerank_candidates): over-fetching
# each 4 times would read 4 x 64 stored vectors per search for a few filtered out.
_RERANK_WIDTHS = (1.25, 4.0, 16.0)


@dataclass(frozen=True)
class _Query:
    """What makes a hit a match for one search: eligibility, calibration, exclusions."""

    vector: np.ndarray  # (D,) L2-normalised
    reference: float  # app.index.calibrate.calibration_reference
    exclude: set[int]
    exclude_near_duplicates: bool
    threshold: float  # settings.near_duplicate_threshold

    def matches(self, hits: list[Hit], allowed: dict[int, str]) -> list[Match]:
        """The hits (best first) that may be recommended: in ``allowed`` (video id -> uri),
        not excluded; calibrated and flagged."""
        out = []
        for h in hits:
            if h.key not in allowed or h.key in self.exclude:
                continue
            calibrated = float(calibrate(h.score, self.reference))
            near = calibrated >= self.threshold
            if near and self.exclude_near_duplicates:
                continue
            out.append(Match(h.key, allowed[h.key], h.score, calibrated, near))
        return out


def search_library(
    *,
    session: Session,
    model: ModelVersion,
    query: np.ndarray,
    k: int,
    exclude: set[int],
    collection: str | None = None,
    exclude_near_duplicates: bool = False,
    query_frames: Frames | None = None,
    settings: Settings | None = None,
) -> tuple[list[Match], int | None]:
    """Top ``k`` enabled library videos most similar to ``query`` (a video vector), never
    those in ``exclude`` (nor, with ``exclude_near_duplicates``, those flagged as
    near-duplicates of the query), only from ``collection`` when given: then min(k, its
    eligible videos) of them (searched exactly where the index search falls short).

    With the query's ``query_frames``, the first ``settings.rerank_candidates`` (at least
    ``k``) are re-ranked by aligning their frames with the query's: the second stage
    (:mod:`app.index.rerank`). Each match then has its frame-alignment score (``match``,
    normalised against the library's background frames), the matched spans, and as its
    ``calibrated`` score the fusion of both stages that it is ranked by. Returns
    the matches and the index version used (None: exact search only)."""
    settings = settings or get_settings()
    second_stage = query_frames is not None and len(query_frames) > 0 and settings.rerank_candidates > 0
    if not second_stage:
        return _first_stage(session=session, model=model, query=query, k=k, exclude=exclude, collection=collection,
                            exclude_near_duplicates=exclude_near_duplicates, settings=settings)  # fmt: skip
    assert query_frames is not None
    candidates, used = _first_stage(session=session, model=model, query=query, k=max(k, settings.rerank_candidates),
                                    exclude=exclude, collection=collection, exclude_near_duplicates=False,
                                    settings=settings, widths=_RERANK_WIDTHS)  # fmt: skip
    stored = _candidate_frames(session=session, model_id=model.id, video_ids=[m.video_id for m in candidates],
                               version=used if settings.index_frames_file else None,
                               limit_mb=settings.rerank_frame_cache_mb)  # fmt: skip
    # Rows from before frame descriptors (migration 0007) are not re-ranked: with none
    # re-rankable the first stage answers alone; otherwise they follow the re-ranked
    # ones, in the first stage's order and on its scale (``match`` None).
    legacy = [m for m in candidates if m.video_id not in stored and not (exclude_near_duplicates and m.near_duplicate)]
    if not stored:
        return legacy[:k], used
    calibrated = {m.video_id: m.calibrated or 0.0 for m in candidates}
    # Spans for the results returned (all of them when near-duplicates are left out: which
    # are returned is known only after).
    aligned = rerank(query_frames, stored, _background(session=session, model=model, version=used), first=calibrated,
                     locate=None if exclude_near_duplicates else k)  # fmt: skip
    threshold = settings.rerank_near_duplicate_threshold
    matches = []
    for m in candidates:
        if m.video_id not in aligned:
            continue
        r = aligned[m.video_id]
        near = r.fused >= threshold
        if not (near and exclude_near_duplicates):
            matches.append(dataclasses.replace(m, calibrated=r.fused, near_duplicate=near, match=r.alignment.score,
                                               query_span=r.alignment.query_span,
                                               span=r.alignment.candidate_span))  # fmt: skip
    matches.sort(key=lambda m: (-(m.calibrated or 0.0), -m.score, m.video_id))
    return (matches + legacy)[:k], used


# Per process: candidates' frame descriptors by (model, video), least recently used first.
# An embedding row is written once per model and video and ids are never reused, so what
# was read stays right; a video disabled or deleted since is no candidate any more.
_frame_cache: OrderedDict[tuple[int, int], Frames] = OrderedDict()
_frame_cache_bytes = 0


def _candidate_frames(
    *, session: Session, model_id: int, video_ids: list[int], version: int | None, limit_mb: int
) -> dict[int, Frames]:
    """The frame descriptors of ``video_ids``: from the copy kept by index ``version``
    (when it is the one open and has one), the rest (videos added since its build) from
    the cache or :func:`queries.stored_frames`."""
    global _frame_cache_bytes
    with _lock:
        files = _serving[1] if _serving is not None and _serving[0].id == version else None
    found = files.frames_of(video_ids) if files is not None else {}
    video_ids = [v for v in video_ids if v not in found]
    if limit_mb <= 0:
        return found | queries.stored_frames(session=session, model_id=model_id, video_ids=video_ids)
    with _lock:
        for video_id in video_ids:
            frames = _frame_cache.get((model_id, video_id))
            if frames is not None:
                _frame_cache.move_to_end((model_id, video_id))
                found[video_id] = frames
    missing = [v for v in video_ids if v not in found]
    read = queries.stored_frames(session=session, model_id=model_id, video_ids=missing) if missing else {}
    with _lock:
        for video_id in missing:  # in the candidates' order, not the rows'
            frames = read.get(video_id)
            if frames is not None and (model_id, video_id) not in _frame_cache:
                _frame_cache[(model_id, video_id)] = frames
                _frame_cache_bytes += frames.vectors.nbytes + frames.times.nbytes
        while _frame_cache_bytes > limit_mb * 1024**2 and _frame_cache:
            _, old = _frame_cache.popitem(last=False)
            _frame_cache_bytes -= old.vectors.nbytes + old.times.nbytes
    return found | read


# Per process: the background frames of the library a model serves, drawn again when the
# index version changes or the library doubles (or halves) in size.
_backgrounds: dict[int, tuple[tuple[int | None, int], Background | None]] = {}


def _background(*, session: Session, model: ModelVersion, version: int | None) -> Background | None:
    with _lock:
        size = _delta.size if _delta is not None and _delta.model_id == model.id else 0
        indexed = len(_serving[1]) if _serving is not None and _serving[0].id == version else 0
        key = (version, (size + indexed).bit_length())
        cached = _backgrounds.get(model.id)
    if cached is not None and cached[0] == key:
        return cached[1]
    videos = queries.background_frames(session=session, model_id=model.id, limit=BACKGROUND_VIDEOS)
    background = Background.of(videos, mirrors=Mirrors.of(model.config))
    with _lock:
        _backgrounds[model.id] = (key, background)
    return background


def _first_stage(
    *,
    session: Session,
    model: ModelVersion,
    query: np.ndarray,
    k: int,
    exclude: set[int],
    collection: str | None,
    exclude_near_duplicates: bool,
    settings: Settings,
    widths: tuple[float, ...] = _WIDTHS,
) -> tuple[list[Match], int | None]:
    """The video-vector search: top ``k`` eligible matches by cosine, calibrated."""
    q = normalise(np.asarray(query, dtype=np.float32).reshape(-1))
    active, searcher = _serving_index(session=session, model=model, settings=settings)
    delta_keys, delta_vecs = _delta_vectors(session=session, model=model, since=active.horizon if active else 0)
    background = background_sample(searcher.background if searcher is not None else None, delta_vecs)
    wanted = _Query(q, calibration_reference(q, background), exclude, exclude_near_duplicates,
                    settings.near_duplicate_threshold)  # fmt: skip
    used = active.id if active is not None else None

    def vectors_of(ids: np.ndarray) -> np.ndarray:
        return queries.stored_vectors(session=session, model_id=model.id, dim=model.dim, video_ids=ids)

    matches: list[Match] = []
    for width in widths:
        fetch = math.ceil((k + len(exclude)) * width)
        hits = merge(
            searcher.search(q, fetch, vectors_of=vectors_of) if searcher is not None else [],
            exact_search(delta_keys, delta_vecs, q, fetch),
            k=fetch,
        )
        candidates = [h.key for h in hits if h.key not in exclude]
        allowed = queries.eligible_videos(session=session, video_ids=candidates, collection=collection)
        matches = wanted.matches(hits, allowed)
        if len(matches) >= k or len(hits) < fetch:  # enough, or every candidate looked at
            return matches[:k], used
        if collection is not None and width == widths[0]:
            members = queries.collection_members(session=session, model_id=model.id, collection=collection,
                                                 limit=EXACT_COLLECTION + 1)  # fmt: skip
            if len(members) <= EXACT_COLLECTION:
                return _search_exactly(session=session, model=model, members=members, wanted=wanted, k=k), used
    if collection is None:
        return matches[:k], used
    # A large collection whose videos the widened search still did not reach: all of them.
    members = queries.collection_members(session=session, model_id=model.id, collection=collection, limit=None)
    return _search_exactly(session=session, model=model, members=members, wanted=wanted, k=k), used


def _search_exactly(
    *, session: Session, model: ModelVersion, members: dict[int, str], wanted: _Query, k: int
) -> list[Match]:
    """The top ``k`` matches among ``members`` (video id -> uri) by their stored vectors."""
    ids = [video_id for video_id in members if video_id not in wanted.exclude]
    found: list[Match] = []
    for start in range(0, len(ids), _EXACT_CHUNK):
        chunk = np.asarray(ids[start : start + _EXACT_CHUNK], dtype=np.int64)
        vectors = queries.stored_vectors(session=session, model_id=model.id, dim=model.dim, video_ids=chunk)
        stored = ~np.isnan(vectors).any(axis=1)  # (an embedding deleted since the members were read)
        hits = exact_search(chunk[stored], normalise(vectors[stored]), wanted.vector, int(stored.sum()))
        found = sorted(found + wanted.matches(hits, members), key=lambda m: (-m.score, m.video_id))[:k]
    return found
