"""Video platforms through yt-dlp's library API, restricted and capped.

- Only allow-listed extractors are loaded (``allowed_extractors``, exact names). The
  *generic* extractor, which turns any web page into downloads and so reaches anything a
  page names, is off unless the source enables it (``allow_generic``).
- ``match_filter`` refuses live streams and entries over the duration or size limits
  before anything is downloaded; the format is capped in height.
- yt-dlp's ``max_filesize`` only reads Content-Length, so a progress hook enforces the
  byte cap on bytes received and the wall-clock cap on every chunk.
- The page URL and the chosen media URLs pass the SSRF policy before any download (yt-dlp
  does its own networking: unlike :mod:`app.crawl.net`, a DNS answer that changes between
  that check and yt-dlp's connection is not caught; keep ``allow_generic`` for trusted
  sources).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from app.config import Settings
from app.crawl.discover import Candidate, Discovery
from app.crawl.net import Budget, Downloaded, Fetcher, FetchError, sniff_video
from app.logs import one_line
from app.media.addresses import Blocked, check_url

logger = logging.getLogger(__name__)


# The generic extractor and the helpers it finds <video> tags and quoted pages with.
_GENERIC = ("generic", "html5", "generic:quoted-html")


def extractors_for(options: dict[str, Any], settings: Settings) -> list[str]:
    """The allow-list as yt-dlp regexes: exact, escaped names; 'generic' only if enabled."""
    names = [str(n).strip().lower() for n in options.get("extractors") or settings.crawl_ytdlp_extractors]
    names = [n for n in names if n and n not in _GENERIC]
    if options.get("allow_generic"):
        names.extend(_GENERIC)
    return [re.escape(n) for n in dict.fromkeys(names)]


def match_filter(options: dict[str, Any], settings: Settings, max_bytes: int) -> Any:
    from yt_dlp.utils import match_filter_func

    max_duration = float(options.get("max_duration_s") or settings.crawl_max_video_seconds)
    return match_filter_func(
        f"!is_live & duration <=? {max_duration:g} & filesize <=? {max_bytes} & filesize_approx <=? {max_bytes}"
    )


def ytdlp_options(
    *,
    settings: Settings,
    options: dict[str, Any],
    tmp_dir: Path | None = None,
    max_bytes: int | None = None,
    hooks: list[Any] | None = None,
) -> dict[str, Any]:
    """YoutubeDL parameters for one source (pure: unit-testable without a network)."""
    cap = max_bytes or settings.crawl_max_download_bytes
    height = int(options.get("max_height") or settings.crawl_ytdlp_max_height)
    params: dict[str, Any] = {
        "allowed_extractors": extractors_for(options, settings),
        "match_filter": match_filter(options, settings, cap),
        # One file (no merging needed), no taller than the cap.
        "format": f"best[height<={height}]/best",
        "max_filesize": cap,
        "http_headers": {"User-Agent": settings.crawl_user_agent},
        "socket_timeout": settings.crawl_timeout_s,
        "retries": settings.crawl_retries,
        "fragment_retries": settings.crawl_retries,
        "sleep_interval_requests": settings.crawl_host_interval_s,
        "sleep_interval": settings.crawl_host_interval_s,
        "playlistend": int(options.get("max_items") or settings.crawl_run_max_items),
        "lazy_playlist": True,
        "extract_flat": "in_playlist",
        "noplaylist": False,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "color": {"stderr": "no_color", "stdout": "no_color"},
        "restrictfilenames": True,
        "windowsfilenames": True,
        "overwrites": True,
        "cachedir": False,
        "no_cache_dir": True,
        "writeinfojson": False,
        "writethumbnail": False,
        "writesubtitles": False,
        "logger": _Logger(),
        "progress_hooks": list(hooks or []),
    }
    if tmp_dir is not None:
        params["outtmpl"] = {"default": str(tmp_dir / "%(extractor_key)s-%(id).60s.%(ext)s")}
        params["paths"] = {"home": str(tmp_dir), "temp": str(tmp_dir)}
    return params


class _Logger:
    def debug(self, msg: str) -> None:
        logger.debug("yt-dlp: %s", msg)

    def info(self, msg: str) -> None:
        logger.debug("yt-dlp: %s", msg)

    def warning(self, msg: str) -> None:
        logger.info("yt-dlp: %s", msg)

    def error(self, msg: str) -> None:
        logger.info("yt-dlp: %s", msg)


def _vet(url: str | None, settings: Settings) -> None:
    if not url or settings.crawl_allow_private:
        return
    try:
        check_url(url, allow_private=False)
    except Blocked as exc:
        raise FetchError("blocked", str(exc)) from None


def discover_platform(fetcher: Fetcher, *, url: str | None, options: dict[str, Any]) -> Discovery:
    """Entries of a platform page (a channel, playlist or one video), without downloading."""
    import yt_dlp

    result = Discovery()
    if not url:
        return result
    settings = fetcher.settings
    try:
        _vet(url, settings)
        if not fetcher.allowed(url):
            raise FetchError("blocked" if fetcher.robots(url).blocked else "robots", "disallowed by robots.txt")
    except FetchError as exc:
        result.error(exc, url)
        return result
    params = ytdlp_options(settings=settings, options=options)
    try:
        with yt_dlp.YoutubeDL(params) as ydl:
            info = ydl.extract_info(url, download=False, process=False)
    except yt_dlp.utils.YoutubeDLError as exc:
        result.error(FetchError("extractor", _reason(exc)), url)
        return result
    result.pages += 1
    fetcher.budget.pages += 1
    if not info:
        return result
    entries = info.get("entries")
    if entries is None:
        result.candidates.append(Candidate(info.get("webpage_url") or url, url, via="ytdlp"))
        return result
    limit = int(options.get("max_items") or settings.crawl_run_max_items)
    for entry in entries:
        if len(result.candidates) >= limit:
            break
        target = (entry or {}).get("url") or (entry or {}).get("webpage_url")
        if target:
            result.candidates.append(Candidate(str(target), url, via="ytdlp"))
    return result


def download_platform(
    url: str,
    *,
    settings: Settings,
    options: dict[str, Any],
    tmp_dir: Path,
    budget: Budget,
    timeout_s: float | None = None,
) -> Downloaded:
    """Downloads one platform entry into ``tmp_dir`` with the byte and time caps."""
    import yt_dlp
    from yt_dlp.utils import DownloadCancelled

    why = budget.exhausted(item=True)
    if why:
        raise FetchError("budget", why, transient=True)
    budget.items += 1
    _vet(url, settings)
    cap = min(settings.crawl_max_download_bytes, max(0, budget.max_bytes - budget.bytes))
    started = time.monotonic()
    deadline = min(started + (timeout_s or settings.crawl_download_timeout_s), budget.deadline)
    tmp_dir.mkdir(parents=True, exist_ok=True)

    class Cancel(DownloadCancelled):  # yt-dlp re-raises DownloadCancelled untouched
        def __init__(self, error: FetchError) -> None:
            super().__init__(error.reason)
            self.error = error

    def hook(progress: dict[str, Any]) -> None:
        received = int(progress.get("downloaded_bytes") or 0)
        if received > cap:
            raise Cancel(FetchError("too_large", f"more than {cap} bytes received"))
        if time.monotonic() > deadline:
            raise Cancel(FetchError("timeout", "download took longer than its time cap"))

    # A folder of its own: whatever yt-dlp leaves behind (parts, fragments) goes with it.
    work = Path(tempfile.mkdtemp(prefix="ytdlp-", dir=tmp_dir))
    params = ytdlp_options(settings=settings, options=options, tmp_dir=work, max_bytes=cap, hooks=[hook])
    params["noplaylist"] = True
    params["extract_flat"] = False
    try:
        with yt_dlp.YoutubeDL(params) as ydl:
            info = ydl.extract_info(url, download=False)
            if info is None:
                raise FetchError("filtered", "refused by the duration/size/live filter")
            for fmt in info.get("requested_formats") or [info]:
                _vet(fmt.get("url"), settings)
            info = ydl.process_ie_result(info, download=True)
        downloads = (info or {}).get("requested_downloads") or []
        found = Path(downloads[0]["filepath"]) if downloads and downloads[0].get("filepath") else None
        if found is None or not found.is_file():
            raise FetchError("filtered", "nothing downloaded (filtered, or over the size limit)")
        path = tmp_dir / f"{uuid.uuid4().hex}.part"
        os.replace(found, path)
    except Cancel as exc:
        raise exc.error from None
    except yt_dlp.utils.YoutubeDLError as exc:
        raise FetchError("extractor", _reason(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = path.stat().st_size
    budget.bytes += size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        head = fh.read(8192)
        digest.update(head)
        while block := fh.read(1 << 20):
            digest.update(block)
    kind = sniff_video(head)
    if kind is None or size > cap:
        path.unlink(missing_ok=True)
        if kind is None:
            raise FetchError("not_video", "the content is not a video by its magic bytes")
        raise FetchError("too_large", f"{size} bytes (limit {cap})")
    return Downloaded(path, url, size, digest.hexdigest(), kind, time.monotonic() - started)


def _reason(exc: BaseException) -> str:
    """yt-dlp's message without its ``ERROR:`` prefix, in one line."""
    return one_line(re.sub(r"^\s*ERROR: ", "", str(exc)) or type(exc).__name__)
