"""Registering videos: local files, globs, folders and http(s) URLs become rows.

The same content (by SHA-256) is registered once, whatever its path or URL.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.media import video as video_io
from app.media.addresses import Blocked, UnresolvableHost, check_url, parse_url, vet_url
from app.media.http import BodyTooLarge, BodyTooSlow, describe_transport_error, iter_body, vetted_client
from app.models import Video

logger = logging.getLogger(__name__)

_DOWNLOAD_TIMEOUT_S = 30.0  # connecting, and each read of the response (the whole: download_deadline_s)

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv"}


class SourceError(ValueError):
    """A source that cannot be registered; str() is the readable reason."""


@dataclass(frozen=True)
class Registered:
    video_id: int
    uri: str
    created: bool
    status: str
    error: str | None


def expand_sources(items: list[str]) -> Iterator[str]:
    """Files as given, globs expanded, folders walked for video files, URLs untouched."""
    for item in items:
        if item.startswith(("http://", "https://")):
            yield item
            continue
        path = Path(_local_path(item)) if item.startswith("file:") else Path(item)
        if path.is_dir():
            for found in sorted(path.rglob("*")):
                if found.is_file() and found.suffix.lower() in VIDEO_SUFFIXES:
                    yield str(found)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise SourceError(f"{item}: no file matches")
            yield from matches
        else:
            yield str(path)


def _local_path(uri: str) -> str:
    return unquote(urlparse(uri).path) if uri.startswith("file:") else uri


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def resolve_local(uri: str, *, settings: Settings, restrict: bool) -> Path:
    """The file a path or file:// URI names. With ``restrict`` (URIs from events, which are
    untrusted) it must lie inside the configured media roots."""
    path = Path(_local_path(uri)).expanduser().resolve()
    if restrict:
        roots = [Path(r).resolve() for r in (settings.media_roots or (settings.media_dir,))]
        if not any(path.is_relative_to(root) for root in roots):
            raise SourceError(f"{uri}: outside the allowed media roots")
    if not path.is_file():
        raise SourceError(f"{uri}: file not found")
    return path


def download(url: str, *, settings: Settings) -> Path:
    """Streams a URL into the media folder with a byte cap and an overall deadline
    (``download_deadline_s``: connecting, headers and body together), named by content hash.

    The URL is checked first for a readable refusal, and the connection goes to a vetted
    address only (app.media.http), so a name that resolves elsewhere by then is refused too.
    The reason goes back to whoever sent the URL (an event's error callback): a refused
    address reads the same whichever it was (see :func:`_refused`).
    """
    try:
        parse_url(url)  # scheme, credentials, host: nothing about the network
    except Blocked as exc:
        raise SourceError(f"{url}: {exc}") from None
    try:
        vet_url(url, allow_private=settings.callback_allow_private)
    except Blocked as exc:
        raise _refused(url, exc) from None
    except UnresolvableHost as exc:
        raise SourceError(f"{url}: {exc}") from None
    settings.media_dir.mkdir(parents=True, exist_ok=True)
    suffix = Path(urlparse(url).path).suffix.lower()
    suffix = suffix if suffix in VIDEO_SUFFIXES else ".mp4"
    fd, tmp_name = tempfile.mkstemp(dir=settings.media_dir, suffix=".part")
    digest = hashlib.sha256()
    deadline = time.monotonic() + settings.download_deadline_s
    too_slow = f"{url}: download did not finish within {settings.download_deadline_s:g} s"
    try:
        with (
            os.fdopen(fd, "wb") as out,
            vetted_client(
                allow_private=settings.callback_allow_private, max_connections=1, deadline=deadline
            ) as client,
            # Identity: a video gains nothing from compression, and a compressed bomb would
            # inflate a whole chunk in memory before the byte cap sees it.
            client.stream("GET", url, headers={"Accept-Encoding": "identity"}, timeout=_DOWNLOAD_TIMEOUT_S) as resp,
        ):
            if resp.status_code != 200:
                raise SourceError(f"{url}: HTTP {resp.status_code}")
            for chunk in iter_body(resp, max_bytes=settings.max_download_bytes, deadline=deadline):
                digest.update(chunk)
                out.write(chunk)
        final = settings.media_dir / f"{digest.hexdigest()}{suffix}"
        os.replace(tmp_name, final)
        return final
    except BodyTooLarge:
        raise SourceError(f"{url}: larger than {settings.max_download_bytes} bytes") from None
    except BodyTooSlow:
        raise SourceError(too_slow) from None
    except Blocked as exc:  # vetted again when connecting: the name now resolves elsewhere
        raise _refused(url, exc) from None
    except UnresolvableHost as exc:
        raise SourceError(f"{url}: {exc}") from None
    except httpx.TransportError as exc:
        if isinstance(exc, httpx.TimeoutException) and time.monotonic() >= deadline:
            raise SourceError(too_slow) from None
        why = describe_transport_error(exc, timeout_s=_DOWNLOAD_TIMEOUT_S)
        raise SourceError(f"{url}: download failed ({why})") from None
    except httpx.HTTPError as exc:
        raise SourceError(f"{url}: download failed ({exc.__class__.__name__}: {exc})") from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _refused(url: str, exc: Blocked) -> SourceError:
    """The one reason given for every address the policy refuses. Which internal address a
    name has (or had when connecting) would map an internal network for whoever sent the
    URL, so only the log, for operators, says which it was."""
    logger.warning("download of %s refused: %s", url, exc)
    return SourceError(f"{url}: refused: the host is not a public address")


@dataclass(frozen=True)
class Fetched:
    """A video's file, downloaded or found, with what probing it said: what registering
    records. ``error``: why the probe refused it (it is still recorded, as failed)."""

    path: Path
    content_hash: str
    size_bytes: int
    info: video_io.VideoInfo | None
    error: str | None


def lookup(session: Session, source: str, *, settings: Settings, restrict: bool) -> tuple[str, Video | None]:
    """The URI ``source`` is registered under, and its row when it is registered already.

    Quick (no download, no hashing, no DNS lookup), so it can run where waiting is not
    allowed; it raises :class:`SourceError` at once for what would never be fetched: a
    URL that is not http(s) or spells out an internal address, a path that is not a
    file, or (with ``restrict``) lies outside the media roots."""
    existing = session.scalar(select(Video).where(Video.uri == source))
    if existing is not None:
        return existing.uri, existing
    if source.startswith(("http://", "https://")):
        try:
            check_url(source, allow_private=settings.callback_allow_private, resolve=False)
        except Blocked as exc:
            raise SourceError(f"{source}: {exc}") from None
        return source, None
    uri = resolve_local(source, settings=settings, restrict=restrict).as_uri()
    return uri, session.scalar(select(Video).where(Video.uri == uri))


def fetch(uri: str, *, settings: Settings, restrict: bool, probe: bool = True) -> Fetched:
    """Downloads (http, https) or finds (a file URI from :func:`lookup`) a video, hashes
    and probes it (in a sandboxed child): the slow part of registering, which touches
    no database, so no transaction need be open while it runs. Raises :class:`SourceError`.

    ``probe=False`` leaves the probe to the decoding child, for a video that is decoded
    next anyway (a cold event's query): that child probes with the same limits and
    refuses with the same reasons, and its start-up (0.35-0.45 s) is paid once, not twice."""
    if uri.startswith(("http://", "https://")):
        path = download(uri, settings=settings)
    else:
        path = resolve_local(uri, settings=settings, restrict=restrict)  # still there, still inside
    info, error = None, None
    if probe:
        try:
            info = video_io.probe(path, limits=video_io.decode_limits(settings))
        except video_io.VideoError as exc:
            error = exc.reason
    return Fetched(path, file_sha256(path), path.stat().st_size, info, error)


def record(
    session: Session, uri: str, fetched: Fetched, *, in_library: bool = True, collection: str | None = None
) -> Registered:
    """Records a fetched video once: the row that already holds its URI or its content
    (same SHA-256), or a new one, 'failed' with the reason when the probe refused it."""
    existing = _holding(session, uri, fetched.content_hash)
    if existing is not None:
        return _registered(existing, created=False, promote=in_library)
    info = fetched.info
    row = Video(
        uri=uri,
        local_path=str(fetched.path),
        content_hash=fetched.content_hash,
        in_library=in_library,
        collection=collection,
        size_bytes=fetched.size_bytes,
        status="failed" if fetched.error else "registered",
        error=fetched.error,
        duration_s=info.duration_s if info else None,
        width=info.width if info else None,
        height=info.height if info else None,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # recorded concurrently (two events naming one new URL at once)
        existing = _holding(session, uri, fetched.content_hash)
        if existing is None:
            raise
        return _registered(existing, created=False, promote=in_library)
    logger.info("registered video %d %s (%s)", row.id, uri, row.status)
    return _registered(row, created=True, promote=in_library)


def register(
    session: Session,
    source: str,
    *,
    settings: Settings,
    in_library: bool = True,
    collection: str | None = None,
    restrict_to_media_roots: bool = False,
) -> Registered:
    """Adds one video (or finds it again): :func:`lookup`, then :func:`fetch` and
    :func:`record`. A video that cannot be probed is still recorded, with status
    'failed' and the reason, so operators can see it. It downloads inside the caller's
    transaction: for the CLI; a worker fetches outside one (app.serve.recommend)."""
    uri, existing = lookup(session, source, settings=settings, restrict=restrict_to_media_roots)
    if existing is not None:
        return _registered(existing, created=False, promote=in_library)
    fetched = fetch(uri, settings=settings, restrict=restrict_to_media_roots)
    return record(session, uri, fetched, in_library=in_library, collection=collection)


def _holding(session: Session, uri: str, content_hash: str) -> Video | None:
    """The video registered under ``uri``, or else the one with this content."""
    by_uri = session.scalar(select(Video).where(Video.uri == uri))
    return by_uri or session.scalar(select(Video).where(Video.content_hash == content_hash))


def _registered(row: Video, *, created: bool, promote: bool) -> Registered:
    if promote and not row.in_library:
        row.in_library = True  # a query-only video later added to the library
    return Registered(row.id, row.uri, created, row.status, row.error)
