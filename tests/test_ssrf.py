"""One outbound HTTP policy on every path that calls a URL someone else chose: callback
delivery (app.deliver.attempt), event video downloads (app.media.register.download) and
the crawler (app.crawl.net.Fetcher). Real sockets on 127.0.0.1: a canary that records
every connection made to it, and a small origin server with a real video. The only fake
is the outside internet: DNS answers for public names (``socket.getaddrinfo``).
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support.media import make_video
from support.net import Canary, DnsTable, install_fake_dns

from app.config import Settings
from app.crawl.net import Fetcher, FetchError
from app.deliver import attempt
from app.media.register import SourceError, download

PATHS = ("callback", "download", "crawler")
PUBLIC = "93.184.216.34"  # a global address: what a public name's first answer looks like
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class Origin(http.server.ThreadingHTTPServer):
    """A web server on 127.0.0.1: GET /v.mp4 is a real video, GET /status/N answers N,
    POST answers 204; ``requests`` records what reached it."""

    daemon_threads = True

    def __init__(self, video: bytes, *, keep_alive: bool = False) -> None:
        self.video = video
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _KeptAliveHandler if keep_alive else _OriginHandler)
        self.port = int(self.server_address[1])
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    server: Origin

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.requests.append(f"GET {self.path}")
        if self.path == "/v.mp4":
            self._answer(200, self.server.video)
        elif self.path.startswith("/status/"):
            self._answer(int(self.path.rsplit("/", 1)[1]), b"internal service says hello")
        else:
            self._answer(404)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(f"POST {self.path}")
        self._answer(204)


class _KeptAliveHandler(_OriginHandler):
    protocol_version = "HTTP/1.1"  # (every answer has a Content-Length)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_video(tmp_path_factory.mktemp("ssrf") / "v.mp4", seconds=1).read_bytes()


@pytest.fixture
def origin(video: bytes) -> Iterator[Origin]:
    server = Origin(video)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def canary() -> Iterator[Canary]:
    with Canary() as c:
        yield c


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Callable[[DnsTable], list[str]]:
    """``fake_dns({"videos.example.com": ["10.0.0.5"]})``: see support.net.install_fake_dns."""
    return functools.partial(install_fake_dns, monkeypatch)


def _policy(settings: Settings, *, allow_private: bool) -> Settings:
    return settings.model_copy(
        update={
            "callback_allow_private": allow_private,
            "crawl_allow_private": allow_private,
            "callback_timeout_s": 2.0,
            "crawl_timeout_s": 2.0,
            "crawl_download_timeout_s": 10.0,
            "crawl_retries": 2,
            "crawl_host_interval_s": 0.0,
        }
    )


def fetch(path: str, url: str, *, settings: Settings, tmp_path: Path) -> tuple[bool, str]:
    """Call ``url`` the way ``path`` does; (succeeded, what the caller was told)."""
    if path == "callback":
        result = attempt.deliver(
            url=url,
            msg_id="msg_ssrf",
            body=b"{}",
            secrets=settings.webhook_secrets,
            allow_private=settings.callback_allow_private,
            timeout_s=settings.callback_timeout_s,
        )
        return result.ok, result.error or f"HTTP {result.status_code}"
    if path == "download":
        try:
            return True, str(download(url, settings=settings.model_copy(update={"data_dir": tmp_path})))
        except SourceError as exc:
            return False, str(exc)
    with Fetcher(settings=settings, sleep=lambda _s: None) as fetcher:
        try:
            return True, str(fetcher.download(url, tmp_dir=tmp_path).path)
        except FetchError as exc:
            return False, str(exc)


# --------------------------------------------------------------------------- rebinding


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("resolver", ["rebinding", "mixed"])
def test_a_public_name_answering_loopback_never_reaches_it(
    path: str, resolver: str, canary: Canary, fake_dns: Callable[[DnsTable], list[str]], settings: Settings,
    tmp_path: Path,
) -> None:  # fmt: skip
    """DNS rebinding: the name answers a public address first and loopback on every later
    lookup ("rebinding"), or both in one answer, public first ("mixed"). However many
    times a path resolves it (an early check, the connection, robots.txt, retries), no
    connection reaches the canary listening on loopback at the URL's port."""
    table: DnsTable = {
        "rebinding": {"videos.example.com": lambda n: [PUBLIC] if n == 0 else ["127.0.0.1"]},
        "mixed": {"videos.example.com": [PUBLIC, "127.0.0.1"]},
    }[resolver]
    lookups = fake_dns(table)
    ok, told = fetch(
        path, f"http://videos.example.com:{canary.port}/v.mp4", settings=_policy(settings, allow_private=False),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert canary.connections == [], (told, canary.connections)
    assert lookups, "the name was resolved through the fake DNS"
    if path != "callback" or resolver == "mixed":
        # The callback path connects to the first, public answer only; what that host
        # says is the outside internet's business. Everything else is refused.
        assert not ok, told
        assert "loopback" in told or "not a public address" in told, told


@pytest.mark.parametrize("path", PATHS)
def test_the_canary_notices_a_connection(
    path: str, canary: Canary, fake_dns: Callable[[DnsTable], list[str]], settings: Settings, tmp_path: Path
) -> None:
    """The harness works: with private addresses allowed, the same name reaches the canary."""
    fake_dns({"videos.example.com": ["127.0.0.1"]})
    fetch(path, f"http://videos.example.com:{canary.port}/v.mp4", settings=_policy(settings, allow_private=True),
          tmp_path=tmp_path)  # fmt: skip
    assert canary.connections


def test_callbacks_on_a_kept_connection_look_the_host_up_once(
    video: bytes, fake_dns: Callable[[DnsTable], list[str]], settings: Settings
) -> None:
    """A callback host is resolved and vetted when a connection to it is opened, not on
    every attempt: a stream of callbacks on a kept connection costs one DNS lookup, so a
    slow resolver does not hold each of them."""
    lookups = fake_dns({"hooks.example.com": ["127.0.0.1"]})
    server = Origin(video, keep_alive=True)
    attempt.close_clients()
    try:
        for _ in range(3):
            result = attempt.deliver(url=f"http://hooks.example.com:{server.port}/hook", msg_id="msg_kept", body=b"{}",
                                     secrets=settings.webhook_secrets, allow_private=True, timeout_s=2.0)  # fmt: skip
            assert result.ok, result
    finally:
        attempt.close_clients()
        server.shutdown()
        server.server_close()
    assert server.requests == ["POST /hook"] * 3
    assert lookups == ["hooks.example.com"]


# --------------------------------------------------------------------------- proxies


@pytest.fixture
def proxy_env(canary: Canary, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every proxy variable names the canary; nothing is exempt from them."""
    proxy = f"http://127.0.0.1:{canary.port}"
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    attempt.close_clients()  # clients made now, under these variables
    yield proxy
    attempt.close_clients()


def test_a_client_trusting_the_environment_would_use_the_proxy(proxy_env: str, canary: Canary, origin: Origin) -> None:
    """The proxy test below means something: httpx's defaults would go through the canary."""
    with httpx.Client() as careless, pytest.raises(httpx.HTTPError):
        careless.get(origin.url("/v.mp4"), timeout=2)
    assert canary.connections and origin.requests == []


@pytest.mark.parametrize("path", PATHS)
def test_proxy_variables_are_ignored(
    path: str, proxy_env: str, canary: Canary, origin: Origin, settings: Settings, tmp_path: Path
) -> None:
    url = origin.url("/hook" if path == "callback" else "/v.mp4")
    ok, told = fetch(path, url, settings=_policy(settings, allow_private=True), tmp_path=tmp_path)
    assert ok, told
    assert canary.connections == []
    assert any(r.endswith(" /hook") or r.endswith(" /v.mp4") for r in origin.requests), origin.requests


# --------------------------------------------------------------------------- what errors tell


def test_download_errors_do_not_tell_what_an_internal_host_answered(
    origin: Origin, fake_dns: Callable[[DnsTable], list[str]], settings: Settings, tmp_path: Path
) -> None:
    """An event's sender reads the download error in its error callback. For an internal
    host it must read the same whatever that host would have answered (a video, 404,
    500, nothing at all) and whichever internal address the name has: no status, no
    address, nothing to map an internal network by. An allowed host's answer is told."""
    closed = Canary()
    with closed:
        closed_port = closed.port  # free once the canary is closed: nothing listens there
    fake_dns({
        "up.example.com": ["127.0.0.1"],
        "private.example.com": ["10.0.0.5"],
        "metadata.example.com": ["169.254.169.254"],
        "rebind.example.com": lambda n: [PUBLIC] if n == 0 else ["127.0.0.1"],
    })  # fmt: skip
    urls = [
        origin.url("/v.mp4"),
        origin.url("/status/404"),
        origin.url("/status/500"),
        f"http://127.0.0.1:{closed_port}/v.mp4",
        f"http://up.example.com:{origin.port}/v.mp4",
        f"http://up.example.com:{origin.port}/status/404",
        f"http://private.example.com:{origin.port}/v.mp4",
        "http://metadata.example.com/latest/meta-data/",
        f"http://rebind.example.com:{origin.port}/status/500",
        f"http://2130706433:{origin.port}/status/404",  # 127.0.0.1, spelled as a number
    ]
    strict = _policy(settings, allow_private=False)
    told = {}
    for url in urls:
        ok, text = fetch("download", url, settings=strict, tmp_path=tmp_path)
        assert not ok and text.startswith(f"{url}: "), text
        told[url] = text.removeprefix(f"{url}: ")
    assert len(set(told.values())) == 1, told
    [reason] = set(told.values())
    assert "not a public address" in reason and "HTTP" not in reason, reason
    assert origin.requests == []  # and indeed nothing was asked

    # A host the policy allows is a host whose answer may be told.
    ok, text = fetch("download", origin.url("/status/404"), settings=_policy(settings, allow_private=True),
                     tmp_path=tmp_path)  # fmt: skip
    assert not ok and text.endswith(": HTTP 404"), text
