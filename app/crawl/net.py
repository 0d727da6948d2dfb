"""Polite, bounded HTTP for the crawler.

One :class:`Fetcher` per crawl run. Every request it makes

- goes through :func:`app.media.http.vetted_client`: the host is resolved and vetted when
  the connection is opened (no loopback, private, link-local/metadata... unless
  ``crawl_allow_private``), so a DNS answer that changes after a check (rebinding) or a
  redirect to an internal host cannot reach one; no cookies, no proxy from the environment;
- is allowed by the host's robots.txt (Protego; fetched once per host and cached), and is
  spaced from the previous request to that host by the host interval, or by robots.txt's
  ``Crawl-delay``/``Request-rate`` when slower;
- sends the configured user agent, follows at most ``crawl_max_redirects`` redirects (each
  hop checked again), retries transient failures (connection errors, 429, 5xx) with
  exponential backoff (tenacity), honouring ``Retry-After``;
- counts against the run's :class:`Budget` (pages, bytes, items, wall clock).

Bodies are streamed: the byte cap is enforced on the bytes actually received (a missing or
lying Content-Length changes nothing), and a download has a wall-clock deadline checked on
every chunk and used as the read timeout, so a server trickling bytes is cut off too.
Failures are :class:`FetchError` with a short ``code`` (for counting) and a readable
``reason``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import filetype
import httpcore
import httpx
from protego import Protego
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_before_delay

from app.config import Settings
from app.media.addresses import Blocked, UnresolvableHost, parse_url
from app.media.http import (
    BodyTooLarge,
    BodyTooSlow,
    describe_transport_error,
    iter_body,
    parse_retry_after,
    vetted_client,
)

logger = logging.getLogger(__name__)

ROBOTS_MAX_BYTES = 512 * 1024  # what Google reads of a robots.txt
SNIFF_BYTES = 8192  # enough for every container's signature (filetype needs 262)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class FetchError(Exception):
    """A URL that could not be fetched. ``code`` groups failures for counting (``robots``,
    ``blocked``, ``http``, ``too_large``, ``timeout``, ``not_video``, ``not_html``,
    ``unreachable``, ``budget``, ``crawl_delay``, ``redirects``); ``reason`` is one line.
    ``transient``: worth trying again in a later run."""

    def __init__(self, code: str, reason: str, *, transient: bool = False) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason, self.transient = code, reason, transient


class _Transient(Exception):
    """A failure worth retrying now (connection error, 429, 5xx)."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after_s = reason, retry_after_s


# --------------------------------------------------------------------------- budget, rates, robots


@dataclass
class Budget:
    """What one run may spend, and what it has spent. ``deadline`` is time.monotonic()."""

    max_pages: int
    max_items: int
    max_bytes: int
    deadline: float
    pages: int = 0
    items: int = 0
    bytes: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, **override: Any) -> Budget:
        values: dict[str, Any] = {
            "max_pages": settings.crawl_run_max_pages,
            "max_items": settings.crawl_run_max_items,
            "max_bytes": settings.crawl_run_max_bytes,
            "deadline": time.monotonic() + settings.crawl_run_max_s,
        }
        values.update({k: v for k, v in override.items() if v is not None})
        return cls(**values)

    def exhausted(self, *, page: bool = False, item: bool = False) -> str | None:
        """Why the run must stop before another page/item, or None."""
        if time.monotonic() >= self.deadline:
            return "run time budget exhausted"
        if self.bytes >= self.max_bytes:
            return f"run byte budget ({self.max_bytes} bytes) exhausted"
        if page and self.pages >= self.max_pages:
            return f"run page budget ({self.max_pages} pages) exhausted"
        if item and self.items >= self.max_items:
            return f"run item budget ({self.max_items} items) exhausted"
        return None

    def as_dict(self) -> dict[str, int]:
        return {"pages": self.pages, "items": self.items, "bytes": self.bytes}


@dataclass
class _Robots:
    parser: Protego | None  # None: no rules (404), everything allowed
    disallow_all: bool  # robots.txt unreachable or 5xx: assume complete disallow (RFC 9309)
    expires: float
    blocked: str | None = None  # the host itself may not be reached (SSRF policy)


@dataclass
class HostLimiter:
    """Spaces requests to one host by at least its interval, measured from the previous
    request, with the interval known *now* (robots.txt's Crawl-delay, read after the
    first request, applies to the second). In-process: crawl runs never overlap (see
    app.crawl.pipeline)."""

    sleep: Callable[[float], None] = time.sleep
    _last: dict[str, float] = field(default_factory=dict)

    def wait(self, host: str, interval_s: float) -> None:
        last = self._last.get(host)
        if last is not None:
            delay = last + interval_s - time.monotonic()
            if delay > 0:
                self.sleep(delay)
        self._last[host] = time.monotonic()


@dataclass(frozen=True)
class Page:
    url: str  # after redirects
    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True)
class Downloaded:
    path: Path  # a temporary name in the tmp folder; the caller moves or deletes it
    url: str  # after redirects
    size: int
    sha256: str
    kind: str  # file extension from the magic bytes, e.g. 'mp4'
    seconds: float


def sniff_video(head: bytes) -> str | None:
    """The container's extension when the magic bytes say video (filetype), else None."""
    kind = filetype.guess(head)
    if kind is not None and kind.mime.startswith("video/"):
        return str(kind.extension)
    return None


def host_key(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.lower()}"


# --------------------------------------------------------------------------- the fetcher


class Fetcher:
    """Polite, capped HTTP for one crawl run (see the module docstring)."""

    def __init__(
        self,
        *,
        settings: Settings,
        budget: Budget | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.budget = budget or Budget.from_settings(settings)
        self.limiter = HostLimiter(sleep=sleep)
        self._sleep = sleep
        self._robots: dict[str, _Robots] = {}
        self.requests = 0
        self._client = vetted_client(
            allow_private=settings.crawl_allow_private,
            headers={"User-Agent": settings.crawl_user_agent, "Accept-Encoding": "gzip, deflate, identity"},
        )

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    # ---------------------------------------------------------------- robots

    def robots(self, url: str) -> _Robots:
        origin = host_key(url)
        cached = self._robots.get(origin)
        if cached is not None and cached.expires > time.monotonic():
            return cached
        ttl = self.settings.crawl_robots_ttl_s
        robots_url = origin + "/robots.txt"
        try:
            page = self._get(robots_url, max_bytes=ROBOTS_MAX_BYTES, deadline=time.monotonic() + 60, check_robots=False)
        except FetchError as exc:
            if exc.code == "http" and exc.reason.startswith("HTTP 4"):
                rules = _Robots(None, disallow_all=False, expires=time.monotonic() + ttl)
            elif exc.code == "blocked":
                rules = _Robots(None, disallow_all=True, expires=time.monotonic() + ttl, blocked=exc.reason)
            else:  # 5xx, unreachable, blocked: stay away for a while, then ask again
                logger.info("robots.txt of %s unavailable (%s): not crawling it for now", origin, exc.reason)
                rules = _Robots(None, disallow_all=True, expires=time.monotonic() + min(ttl, 600))
        else:
            parser = Protego.parse(page.body.decode("utf-8", errors="replace"))
            rules = _Robots(parser, disallow_all=False, expires=time.monotonic() + ttl)
        self._robots[origin] = rules
        return rules

    def allowed(self, url: str) -> bool:
        rules = self.robots(url)
        if rules.disallow_all:
            return False
        return rules.parser is None or bool(rules.parser.can_fetch(url, self.settings.crawl_user_agent))

    def host_interval(self, url: str) -> float:
        """Seconds between two requests to ``url``'s host: ours, or robots.txt's if slower."""
        interval = self.settings.crawl_host_interval_s
        rules = self._robots.get(host_key(url))
        if rules is not None and rules.parser is not None:
            delay = rules.parser.crawl_delay(self.settings.crawl_user_agent)
            if delay:
                interval = max(interval, float(delay))
            rate = rules.parser.request_rate(self.settings.crawl_user_agent)
            if rate and rate.requests:
                interval = max(interval, rate.seconds / rate.requests)
        return interval

    def _check(self, url: str) -> None:
        try:
            parse_url(url)
        except Blocked as exc:
            raise FetchError("blocked", str(exc)) from None
        if not self.allowed(url):
            blocked = self.robots(url).blocked
            if blocked:
                raise FetchError("blocked", blocked)
            raise FetchError("robots", f"disallowed by {host_key(url)}/robots.txt")
        if self.host_interval(url) > self.settings.crawl_max_crawl_delay_s:
            raise FetchError(
                "crawl_delay",
                f"{host_key(url)} asks for {self.host_interval(url):g} s between requests "
                f"(limit {self.settings.crawl_max_crawl_delay_s:g} s)",
                transient=True,
            )

    # ---------------------------------------------------------------- requests

    @contextlib.contextmanager
    def _open(
        self, url: str, *, deadline: float, check_robots: bool = True, compressed: bool = True
    ) -> Iterator[httpx.Response]:
        """A streaming 200 response for ``url`` after redirects (each hop checked), with
        retries for transient failures. Raises FetchError."""
        retryer = Retrying(
            stop=stop_after_attempt(max(1, self.settings.crawl_retries))
            | stop_before_delay(max(0.0, deadline - time.monotonic())),
            wait=self._retry_wait,
            retry=retry_if_exception_type(_Transient),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            response = retryer(
                self._open_once, url, deadline=deadline, check_robots=check_robots, compressed=compressed
            )
        except _Transient as exc:
            raise FetchError("unreachable", exc.reason, transient=True) from None
        try:
            yield response
        finally:
            response.close()

    def _retry_wait(self, state: Any) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        backoff = min(self.settings.crawl_retry_max_wait_s, 0.5 * 2 ** (state.attempt_number - 1))
        if isinstance(exc, _Transient) and exc.retry_after_s is not None:
            return min(self.settings.crawl_retry_max_wait_s, max(backoff, exc.retry_after_s))
        return backoff

    def _open_once(self, url: str, *, deadline: float, check_robots: bool, compressed: bool) -> httpx.Response:
        current = url
        for _hop in range(self.settings.crawl_max_redirects + 1):
            if check_robots:
                self._check(current)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError("timeout", "timed out before the request could be made")
            self.limiter.wait(host_key(current), self.host_interval(current))
            per_op = max(0.1, min(self.settings.crawl_timeout_s, deadline - time.monotonic()))
            # Videos gain nothing from compression, and a compressed bomb would inflate a
            # whole chunk in memory before the cap sees it.
            headers = None if compressed else {"Accept-Encoding": "identity"}
            request = self._client.build_request("GET", current, headers=headers, timeout=httpx.Timeout(per_op))
            self.requests += 1
            try:
                response = self._client.send(request, stream=True)
            except (Blocked, UnresolvableHost) as exc:  # raised when connecting (app.media.http)
                raise FetchError("blocked", str(exc)) from None
            except httpx.TimeoutException:
                if time.monotonic() >= deadline:
                    raise FetchError("timeout", "no response before the deadline") from None
                raise _Transient("timed out connecting or waiting for the response") from None
            except (httpx.TransportError, httpcore.NetworkError) as exc:
                raise _Transient(describe_transport_error(exc, timeout_s=per_op)) from None
            status = response.status_code
            if status in _REDIRECTS and "location" in response.headers:
                response.close()
                current = urljoin(current, response.headers["location"])
                continue
            if status == 200:
                return response
            response.close()
            if status == 429 or status >= 500:
                raise _Transient(f"HTTP {status}", parse_retry_after(response.headers.get("retry-after")))
            raise FetchError("http", f"HTTP {status}")
        raise FetchError("redirects", f"more than {self.settings.crawl_max_redirects} redirects")

    def _get(self, url: str, *, max_bytes: int, deadline: float, check_robots: bool = True) -> Page:
        with self._open(url, deadline=deadline, check_robots=check_robots) as response:
            body = b"".join(self._stream(response, max_bytes=max_bytes, deadline=deadline))
            return Page(str(response.url), response.status_code, response.headers.get("content-type", ""), body)

    def _stream(self, response: httpx.Response, *, max_bytes: int, deadline: float) -> Iterator[bytes]:
        """The decoded body in chunks, counted against the run's byte budget, refused past
        ``max_bytes`` (declared or received), stopping at the deadline (checked on every
        chunk; the read timeout is bounded by it too)."""
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise FetchError("too_large", f"declares {declared} bytes (limit {max_bytes})")
        try:
            for chunk in iter_body(response, max_bytes=max_bytes, deadline=deadline):
                self.budget.bytes += len(chunk)
                yield chunk
        except BodyTooLarge as exc:
            raise FetchError("too_large", f"{exc} (no or false Content-Length)") from None
        except BodyTooSlow:
            raise FetchError("timeout", "download took longer than its time cap") from None
        except httpx.TimeoutException:
            raise FetchError("timeout", "the server stopped sending before the time cap") from None
        except httpx.DecodingError as exc:
            raise FetchError("http", f"bad content encoding: {exc}"[:200]) from None
        except (httpx.TransportError, httpcore.NetworkError) as exc:
            raise FetchError("unreachable", f"connection lost: {type(exc).__name__}", transient=True) from None

    def get_page(self, url: str, *, max_bytes: int | None = None) -> Page:
        """An HTML page, feed, sitemap or list (counts one page of the budget)."""
        why = self.budget.exhausted(page=True)
        if why:
            raise FetchError("budget", why, transient=True)
        self.budget.pages += 1
        cap = min(max_bytes or self.settings.crawl_max_page_bytes, self.settings.crawl_max_page_bytes)
        return self._get(url, max_bytes=cap, deadline=time.monotonic() + self.settings.crawl_download_timeout_s)

    def download(
        self, url: str, *, tmp_dir: Path, max_bytes: int | None = None, timeout_s: float | None = None
    ) -> Downloaded:
        """Streams a video to a temporary file in ``tmp_dir``, refusing as soon as the magic
        bytes are not a video's, the bytes exceed the cap, or the time cap passes."""
        why = self.budget.exhausted(item=True)
        if why:
            raise FetchError("budget", why, transient=True)
        self.budget.items += 1
        cap = min(max_bytes or self.settings.crawl_max_download_bytes, self.settings.crawl_max_download_bytes)
        remaining_budget = self.budget.max_bytes - self.budget.bytes
        started = time.monotonic()
        # The run's own deadline bounds a download too (tasks have a hard time limit).
        deadline = min(started + (timeout_s or self.settings.crawl_download_timeout_s), self.budget.deadline)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
        digest, size, kind = hashlib.sha256(), 0, None
        try:
            with self._open(url, deadline=deadline, compressed=False) as response, open(tmp, "wb") as out:
                head = b""
                for chunk in self._stream(response, max_bytes=cap, deadline=deadline):
                    size += len(chunk)
                    if size > remaining_budget:
                        raise FetchError("budget", "run byte budget exhausted during the download", transient=True)
                    if kind is None:
                        head += chunk
                        if len(head) >= SNIFF_BYTES:
                            kind = self._sniff(head)
                    digest.update(chunk)
                    out.write(chunk)
                if kind is None:
                    kind = self._sniff(head)
                final_url = str(response.url)
            return Downloaded(tmp, final_url, size, digest.hexdigest(), kind, time.monotonic() - started)
        except FetchError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if exc.code == "timeout" and time.monotonic() >= self.budget.deadline:
                raise FetchError("budget", "run time budget exhausted during the download", transient=True) from None
            raise
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @staticmethod
    def _sniff(head: bytes) -> str:
        kind = sniff_video(head)
        if kind is None:
            guessed = filetype.guess(head)
            what = guessed.mime if guessed else "unknown type"
            raise FetchError("not_video", f"the content is not a video by its magic bytes ({what})")
        return kind
