"""Finding video URLs: in HTML pages, RSS/Atom feeds, XML sitemaps and URL lists.

Parsers are pure functions over bytes (tested without a network); :func:`discover` walks a
source through a :class:`~app.crawl.net.Fetcher`, within the source's depth and page budget
and the run's budget. Platform pages (yt-dlp) are in :mod:`app.crawl.platform`.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urldefrag, urljoin, urlsplit

import feedparser
import lxml.etree
import lxml.html

from app.crawl.net import Fetcher, FetchError
from app.media.register import VIDEO_SUFFIXES

logger = logging.getLogger(__name__)

_OG_VIDEO = ("og:video", "og:video:url", "og:video:secure_url", "twitter:player:stream")
_SITEMAP_NS = "http://www.sitemaps.org/schemas/sitemap/0.9"
_VIDEO_NS = "http://www.google.com/schemas/sitemap-video/1.1"
# XML from the web: no entities, no DTDs, no network, no huge trees (billion laughs, XXE).
_XML_PARSER = lxml.etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, recover=True
)


@dataclass(frozen=True)
class Candidate:
    """A video URL found on ``page_url``. ``via``: 'http' (a file) or 'ytdlp' (a page
    that yt-dlp turns into a file)."""

    url: str
    page_url: str | None
    via: str = "http"


@dataclass
class PageLinks:
    videos: list[str] = field(default_factory=list)
    pages: list[str] = field(default_factory=list)


def normalise(url: str, base: str | None = None) -> str | None:
    """Absolute http(s) URL without fragment, or None for anything else (mailto:, data:...)."""
    url = url.strip()
    if not url:
        return None
    absolute = urljoin(base, url) if base else url
    absolute, _ = urldefrag(absolute)
    parts = urlsplit(absolute)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return absolute


def looks_like_video(url: str) -> bool:
    return PurePosixPath(urlsplit(url).path).suffix.lower() in VIDEO_SUFFIXES


# --------------------------------------------------------------------------- parsers


def parse_html(body: bytes, url: str) -> PageLinks:
    """Video URLs (``<video src>``, ``<video><source src>``, og:video metadata, links to
    video files) and the other links of an HTML page, resolved against ``<base href>``."""
    found = PageLinks()
    try:
        doc = lxml.html.document_fromstring(body)
    except (lxml.etree.ParserError, ValueError):
        return found
    base = url
    for href in doc.xpath("//base/@href")[:1]:
        base = normalise(str(href), url) or url
    videos: dict[str, None] = {}
    for value in doc.xpath("//video/@src | //video//source/@src"):
        if (target := normalise(str(value), base)) is not None:
            videos[target] = None
    for meta in doc.xpath("//meta[@property or @name]"):
        key = (meta.get("property") or meta.get("name") or "").strip().lower()
        if key in _OG_VIDEO and (target := normalise(meta.get("content") or "", base)) is not None:
            videos[target] = None
    pages: dict[str, None] = {}
    for value in doc.xpath("//a/@href"):
        target = normalise(str(value), base)
        if target is None:
            continue
        if looks_like_video(target):
            videos[target] = None
        else:
            pages[target] = None
    found.videos, found.pages = list(videos), [p for p in pages if p not in videos]
    return found


def parse_feed(body: bytes, url: str) -> list[str]:
    """Video URLs in an RSS/Atom feed: enclosures (and Media RSS content) of a video type
    or with a video file name, and entry links to video files."""
    parsed = feedparser.parse(body, response_headers={"content-location": url})
    videos: dict[str, None] = {}
    for entry in parsed.entries:
        media: list[Any] = list(entry.get("enclosures", [])) + list(entry.get("media_content", []))
        for item in media:
            href = item.get("href") or item.get("url") or ""
            kind = str(item.get("type") or item.get("medium") or "")
            target = normalise(href, url)
            if target and (kind.startswith("video") or looks_like_video(target)):
                videos[target] = None
        for link in entry.get("links", []):
            target = normalise(link.get("href", ""), url)
            if target and (str(link.get("type", "")).startswith("video/") or looks_like_video(target)):
                videos[target] = None
    return list(videos)


@dataclass
class SitemapLinks:
    videos: list[str] = field(default_factory=list)  # video:content_loc, or <loc> of a video file
    pages: list[str] = field(default_factory=list)  # other <loc>s (pages that may hold videos)
    sitemaps: list[str] = field(default_factory=list)  # children of a sitemap index


def parse_sitemap(body: bytes, url: str) -> SitemapLinks:
    """A sitemap, a sitemap index, or a video sitemap (gzipped or not)."""
    found = SitemapLinks()
    if body[:2] == b"\x1f\x8b":
        body = _gunzip(body, limit=50 * 1024**2)  # the sitemap protocol's own size limit
    try:
        root = lxml.etree.fromstring(body, parser=_XML_PARSER)
    except lxml.etree.XMLSyntaxError:
        root = None
    if root is None:
        # A text sitemap: one URL per line.
        for line in body.decode("utf-8", errors="replace").splitlines():
            if (target := normalise(line, url)) is not None:
                (found.videos if looks_like_video(target) else found.pages).append(target)
        return found
    tag = lxml.etree.QName(root).localname
    ns = {"sm": _SITEMAP_NS, "video": _VIDEO_NS}
    if tag == "sitemapindex":
        for loc in root.iterfind("sm:sitemap/sm:loc", ns):
            if (target := normalise(loc.text or "", url)) is not None:
                found.sitemaps.append(target)
        return found
    for entry in root.iterfind("sm:url", ns):
        contents = [normalise(e.text or "", url) for e in entry.iterfind("video:video/video:content_loc", ns)]
        contents = [c for c in contents if c]
        found.videos.extend(c for c in contents if c is not None)
        loc_el = entry.find("sm:loc", ns)
        loc = normalise(loc_el.text or "", url) if loc_el is not None else None
        if loc is None:
            continue
        if looks_like_video(loc):
            found.videos.append(loc)
        elif not contents:
            found.pages.append(loc)
    found.videos = list(dict.fromkeys(found.videos))
    found.pages = list(dict.fromkeys(found.pages))
    return found


def parse_url_list(body: bytes, url: str) -> list[str]:
    out = []
    for line in body.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and (target := normalise(line, url)) is not None:
            out.append(target)
    return list(dict.fromkeys(out))


def _gunzip(data: bytes, *, limit: int) -> bytes:
    """Decompress at most ``limit`` bytes (a gzip bomb stops there)."""
    try:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = inflater.decompress(data, limit)
    except zlib.error:
        try:
            return gzip.decompress(data)[:limit]
        except (OSError, EOFError):
            return b""
    return out


# --------------------------------------------------------------------------- walking a source


@dataclass
class Discovery:
    """What walking one source found, and what went wrong on the way."""

    candidates: list[Candidate] = field(default_factory=list)
    pages: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, exc: FetchError, url: str) -> None:
        self.errors[exc.code] = self.errors.get(exc.code, 0) + 1
        logger.info("discovery: %s: %s", url, exc.reason)


def discover(fetcher: Fetcher, *, kind: str, url: str | None, options: dict[str, Any]) -> Discovery:
    """Candidates of one source (every kind but 'platform')."""
    result = Discovery()
    seen: dict[str, None] = {}

    def add(found: str, page: str | None) -> None:
        if found not in seen:
            seen[found] = None
            result.candidates.append(Candidate(found, page))

    if kind == "url_list":
        for listed in options.get("urls", []):
            if (target := normalise(str(listed))) is not None:
                add(target, None)
        if url:
            page = _page(fetcher, url, result)
            if page is not None:
                for target in parse_url_list(page, url):
                    add(target, url)
    elif kind == "feed":
        if url and (page := _page(fetcher, url, result)) is not None:
            for target in parse_feed(page, url):
                add(target, url)
    elif kind == "web_page":
        for video, page_url in _walk_pages(fetcher, url, options, result):
            add(video, page_url)
    elif kind == "sitemap":
        for video, page_url in _walk_sitemaps(fetcher, url, options, result):
            add(video, page_url)
    else:
        raise ValueError(f"discover() does not handle sources of kind {kind!r}")
    return result


def _page(fetcher: Fetcher, url: str, result: Discovery) -> bytes | None:
    try:
        page = fetcher.get_page(url)
    except FetchError as exc:
        result.error(exc, url)
        return None
    result.pages += 1
    return page.body


def _walk_pages(
    fetcher: Fetcher, start: str | None, options: dict[str, Any], result: Discovery
) -> Iterator[tuple[str, str]]:
    """Breadth-first over HTML pages from ``start``: depth ``max_depth`` (0: the start page
    only), at most ``max_pages`` pages, on the start page's host unless ``same_host`` is off."""
    if not start:
        return
    max_depth = int(options.get("max_depth", 1))
    max_pages = int(options.get("max_pages", 50))
    same_host = bool(options.get("same_host", True))
    host = urlsplit(start).netloc.lower()
    queue: deque[tuple[str, int]] = deque([(start, 0)])
    queued = {start}
    fetched = 0
    while queue and fetched < max_pages:
        page_url, depth = queue.popleft()
        try:
            page = fetcher.get_page(page_url)
        except FetchError as exc:
            result.error(exc, page_url)
            if exc.code == "budget":
                return
            continue
        fetched += 1
        result.pages += 1
        if "html" not in page.content_type.lower() and not page.body.lstrip()[:15].lower().startswith(
            (b"<!doctype", b"<html")
        ):
            continue
        links = parse_html(page.body, page.url)
        for video in links.videos:
            yield video, page.url
        if depth >= max_depth:
            continue
        for link in links.pages:
            if link in queued or (same_host and urlsplit(link).netloc.lower() != host):
                continue
            queued.add(link)
            queue.append((link, depth + 1))


def _walk_sitemaps(
    fetcher: Fetcher, start: str | None, options: dict[str, Any], result: Discovery
) -> Iterator[tuple[str, str]]:
    """A sitemap (index) and, with ``follow_pages``, the pages it lists (read for videos,
    not followed further); ``max_pages`` bounds sitemaps and pages together."""
    if not start:
        return
    max_pages = int(options.get("max_pages", 200))
    follow_pages = bool(options.get("follow_pages", True))
    sitemaps: deque[str] = deque([start])
    done: set[str] = set()
    pages: list[str] = []
    spent = 0
    while sitemaps and spent < max_pages:
        sitemap_url = sitemaps.popleft()
        if sitemap_url in done:
            continue
        done.add(sitemap_url)
        body = _page(fetcher, sitemap_url, result)
        spent += 1
        if body is None:
            continue
        links = parse_sitemap(body, sitemap_url)
        sitemaps.extend(links.sitemaps)
        for video in links.videos:
            yield video, sitemap_url
        pages.extend(links.pages)
    if not follow_pages:
        return
    for page_url in dict.fromkeys(pages):
        if spent >= max_pages:
            break
        spent += 1
        try:
            page = fetcher.get_page(page_url)
        except FetchError as exc:
            result.error(exc, page_url)
            if exc.code == "budget":
                return
            continue
        result.pages += 1
        for video in parse_html(page.body, page.url).videos:
            yield video, page.url
