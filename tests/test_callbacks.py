"""Signing (app.deliver.signing), one delivery attempt (app.deliver.attempt) and the URL
policy it follows (app.media.addresses), against a real HTTP(S) server on 127.0.0.1 (no mocks
of httpx internals).

The only fakes are of the outside world: ``socket.getaddrinfo`` is patched to make a public
looking name resolve where a test wants it, and one test uses httpx's documented
``MockTransport`` to see exactly which address a request was sent to.
"""

from __future__ import annotations

import email.utils
import functools
import http.server
import json
import random
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from support.helpers import require_tool
from support.net import DnsTable, install_fake_dns

from app.config import DEV_WEBHOOK_SECRET, STANDARD_RETRY_SCHEDULE
from app.deliver.attempt import DeliveryResult, deliver, next_delay_s
from app.deliver.signing import generate_secret, sign, verify
from app.media.addresses import Blocked, check_url

SECRET = DEV_WEBHOOK_SECRET
OTHER_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="  # 32 bytes
BODY = json.dumps({"type": "video.indexed", "data": {"video_id": 42}}).encode()


# --------------------------------------------------------------------------- receiver


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay_s: float = 0.0  # before answering
    endless: bool = False  # stream a long body (until the client goes away or `limit`)
    drip_s: float = 0.0  # with endless: pause between 1-byte chunks
    limit: int = 64 * 1024 * 1024  # endless bodies end after this many bytes


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int  # which connection it came on


class ReceiverServer(http.server.ThreadingHTTPServer):
    receiver: Receiver


class Receiver:
    """A real HTTP(S) server on 127.0.0.1 that answers as told and records requests."""

    def __init__(self, server: ReceiverServer, scheme: str = "http") -> None:
        self.server = server
        self.port = int(server.server_address[1])
        self.url = f"{scheme}://127.0.0.1:{self.port}/hook"
        self.answer = Answer()
        self.requests: list[Seen] = []
        self.stop = threading.Event()
        self.body_bytes_sent = 0
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def answer_with(self, **kwargs: object) -> None:
        self.answer = Answer(**kwargs)  # type: ignore[arg-type]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ReceiverServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        receiver = self.server.receiver
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        receiver.requests.append(Seen(self.path, dict(self.headers.items()), body, self.client_address[1]))
        answer = receiver.answer
        try:
            if answer.delay_s and receiver.stop.wait(answer.delay_s):
                return
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            if answer.endless:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"x" if answer.drip_s else b"x" * 65536
                frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
                while not receiver.stop.is_set() and receiver.body_bytes_sent < answer.limit:
                    self.wfile.write(frame)
                    self.wfile.flush()
                    receiver.body_bytes_sent += len(chunk)
                    if answer.drip_s:
                        receiver.stop.wait(answer.drip_s)
                self.wfile.write(b"0\r\n\r\n")
                return
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
        except OSError:  # the client hung up (timeout test, capped body)
            self.close_connection = True


def _start(scheme: str = "http", context: ssl.SSLContext | None = None) -> Receiver:
    server = ReceiverServer(("127.0.0.1", 0), Handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    receiver = Receiver(server, scheme)
    server.receiver = receiver
    receiver.thread.start()
    return receiver


def _stop(receiver: Receiver) -> None:
    receiver.stop.set()  # releases slow / endless handlers
    receiver.server.shutdown()
    receiver.server.server_close()  # joins the handler threads
    receiver.thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = _start()
    yield r
    _stop(r)


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Callable[[DnsTable], list[str]]:
    """``fake_dns({"hooks.example.com": ["10.0.0.5"]})``: see support.net.install_fake_dns."""
    return functools.partial(install_fake_dns, monkeypatch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(receiver: Receiver, **kwargs: object) -> DeliveryResult:
    args: dict = {
        "url": receiver.url,
        "msg_id": "msg_test_1",
        "body": BODY,
        "secrets": [SECRET],
        "allow_private": True,
        "timeout_s": 5.0,
    }
    args.update(kwargs)
    return deliver(**args)


# --------------------------------------------------------------------------- signatures


def test_delivered_callback_verifies(receiver: Receiver) -> None:
    result = _send(receiver)
    assert result.ok and result.status_code == 200 and result.error is None
    assert not result.disable and result.retry_after_s is None and result.duration_ms > 0

    [seen] = receiver.requests
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert seen.body == BODY and seen.path == "/hook"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "vidsim"
    assert headers["webhook-id"] == "msg_test_1"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["host"] == f"127.0.0.1:{receiver.port}"

    payload = json.loads(BODY)
    assert verify(secret=SECRET, headers=seen.headers, body=seen.body) == payload
    # The reference implementation agrees.
    assert Webhook(SECRET).verify(seen.body, seen.headers) == payload


def test_tampered_wrong_secret_and_stale_are_rejected(receiver: Receiver) -> None:
    _send(receiver)
    [seen] = receiver.requests
    with pytest.raises(WebhookVerificationError):
        verify(secret=SECRET, headers=seen.headers, body=seen.body.replace(b"42", b"43"))
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(seen.body.replace(b"42", b"43"), seen.headers)
    with pytest.raises(WebhookVerificationError):
        verify(secret=OTHER_SECRET, headers=seen.headers, body=seen.body)
    # The id is signed too: a replay under another id fails.
    with pytest.raises(WebhookVerificationError):
        verify(secret=SECRET, headers={**seen.headers, "webhook-id": "msg_2"}, body=seen.body)

    now = int(time.time())
    stale = sign(secrets=[SECRET], msg_id="m", timestamp=now - 600, body=BODY)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(secret=SECRET, headers=stale, body=BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY, stale)
    assert verify(secret=SECRET, headers=stale, body=BODY, tolerance_s=900)["data"]
    future = sign(secrets=[SECRET], msg_id="m", timestamp=now + 600, body=BODY)
    with pytest.raises(WebhookVerificationError, match="too new"):
        verify(secret=SECRET, headers=future, body=BODY)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"webhook-id": "m", "webhook-timestamp": "x", "webhook-signature": "v1,AAAA"},
        {"webhook-id": "m", "webhook-timestamp": "{now}", "webhook-signature": "garbage"},
        {"webhook-id": "m", "webhook-timestamp": "{now}", "webhook-signature": "v1,!!!"},
        {"webhook-id": "m", "webhook-timestamp": "{now}", "webhook-signature": "v2,AAAA"},
    ],
)
def test_malformed_headers_are_rejected_not_crashing(headers: dict[str, str]) -> None:
    now = str(int(time.time()))
    headers = {k: v.replace("{now}", now) for k, v in headers.items()}
    with pytest.raises(WebhookVerificationError):
        verify(secret=SECRET, headers=headers, body=BODY)


def test_rotation_either_secret_accepts(receiver: Receiver) -> None:
    result = _send(receiver, secrets=[OTHER_SECRET, SECRET])
    assert result.ok
    [seen] = receiver.requests
    signatures = {k.lower(): v for k, v in seen.headers.items()}["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    for secret in (SECRET, OTHER_SECRET):
        assert verify(secret=secret, headers=seen.headers, body=seen.body)["data"]
        assert Webhook(secret).verify(seen.body, seen.headers)["data"]
    with pytest.raises(WebhookVerificationError):
        verify(secret=generate_secret(), headers=seen.headers, body=seen.body)


def test_sign_refuses_bad_configuration() -> None:
    for bad in (
        [],
        ["not-a-secret"],
        ["whsec_***notbase64***"],
        ["whsec_c2hvcnQ="],  # 5 bytes
        SECRET,  # a string, not a list
    ):
        with pytest.raises(ValueError):
            sign(secrets=bad, msg_id="m", timestamp=1_700_000_000, body=BODY)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sign(secrets=[SECRET], msg_id="has space", timestamp=1, body=BODY)
    with pytest.raises(ValueError):
        sign(secrets=[SECRET], msg_id="m", timestamp=1, body=b"\xff")
    headers = sign(secrets=[SECRET, SECRET], msg_id="m", timestamp=1_700_000_000, body=BODY)
    assert headers["webhook-timestamp"] == "1700000000"
    assert " " not in headers["webhook-signature"]  # duplicate secrets sign once
    assert generate_secret().startswith("whsec_")


# --------------------------------------------------------------------------- HTTP outcomes


def test_500_is_a_failure(receiver: Receiver) -> None:
    receiver.answer_with(status=500, body=b"boom")
    result = _send(receiver)
    assert (result.ok, result.status_code, result.error) == (False, 500, "HTTP 500")
    assert not result.disable and result.retry_after_s is None


def test_410_disables(receiver: Receiver) -> None:
    receiver.answer_with(status=410)
    result = _send(receiver)
    assert (result.ok, result.status_code, result.disable) == (False, 410, True)


def test_429_retry_after_seconds(receiver: Receiver) -> None:
    receiver.answer_with(status=429, headers={"Retry-After": "7"})
    result = _send(receiver)
    assert (result.ok, result.status_code, result.retry_after_s) == (False, 429, 7)
    assert result.error == "HTTP 429" and not result.disable


def test_503_retry_after_http_date(receiver: Receiver) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    receiver.answer_with(status=503, headers={"Retry-After": when})
    result = _send(receiver)
    assert result.status_code == 503
    assert result.retry_after_s is not None and 115 <= result.retry_after_s <= 121


def test_retry_after_ignored_elsewhere_and_when_garbled(receiver: Receiver) -> None:
    receiver.answer_with(status=500, headers={"Retry-After": "7"})
    assert _send(receiver).retry_after_s is None
    receiver.answer_with(status=429, headers={"Retry-After": "soon"})
    assert _send(receiver).retry_after_s is None


def test_redirect_is_not_followed(receiver: Receiver) -> None:
    receiver.answer_with(status=302, headers={"Location": "http://169.254.169.254/"})
    result = _send(receiver)
    assert (result.ok, result.status_code) == (False, 302)
    assert result.error == "redirect (HTTP 302) not followed"
    assert len(receiver.requests) == 1


def test_redirect_not_followed_even_by_a_client_that_would(receiver: Receiver) -> None:
    receiver.answer_with(status=307, headers={"Location": f"{receiver.url}/again"})
    with httpx.Client(follow_redirects=True) as client:
        result = _send(receiver, client=client)
    assert result.error == "redirect (HTTP 307) not followed"
    assert [r.path for r in receiver.requests] == ["/hook"]


def test_timeout_is_reported(receiver: Receiver) -> None:
    receiver.answer_with(delay_s=10)
    started = time.monotonic()
    result = _send(receiver, timeout_s=0.3)
    assert time.monotonic() - started < 3
    assert (result.ok, result.status_code) == (False, None)
    assert result.error == "timed out after 0.3 s"


def test_connection_refused_is_reported() -> None:
    port = _free_port()
    result = deliver(
        url=f"http://127.0.0.1:{port}/hook",
        msg_id="m",
        body=BODY,
        secrets=[SECRET],
        allow_private=True,
        timeout_s=2,
    )
    assert (result.ok, result.status_code, result.error) == (False, None, "connection refused")


def test_endless_response_body_is_capped(receiver: Receiver) -> None:
    receiver.answer_with(endless=True)  # 64 MiB
    result = _send(receiver, timeout_s=5)
    assert result.ok and result.status_code == 200
    # The client hung up long before the end (what was sent beyond 64 KiB sat in buffers).
    time.sleep(0.1)
    assert receiver.body_bytes_sent < 32 * 1024 * 1024


def test_dripping_response_body_stops_at_the_deadline(receiver: Receiver) -> None:
    receiver.answer_with(endless=True, drip_s=0.05, limit=60)  # 1 byte / 50 ms for 3 s
    started = time.monotonic()
    result = _send(receiver, timeout_s=0.5)
    assert result.status_code == 200
    assert 0.4 <= time.monotonic() - started < 2


# --------------------------------------------------------------------------- SSRF


def test_loopback_refused_unless_private_allowed(receiver: Receiver) -> None:
    result = _send(receiver, allow_private=False)
    assert (result.ok, result.status_code) == (False, None)
    assert result.error == "blocked: 127.0.0.1 is a loopback address"
    assert receiver.requests == []  # nothing reached the server

    assert _send(receiver, allow_private=True).ok
    assert len(receiver.requests) == 1


def test_localhost_name_is_pinned_and_allowed_when_private_allowed(receiver: Receiver) -> None:
    url = f"http://localhost:{receiver.port}/hook"
    assert not _send(receiver, url=url, allow_private=False).ok
    result = _send(receiver, url=url, allow_private=True)
    assert result.ok, result.error
    assert {k.lower(): v for k, v in receiver.requests[0].headers.items()}["host"] == f"localhost:{receiver.port}"


def test_connections_are_kept_per_host_name(receiver: Receiver, fake_dns: Callable[..., list[str]]) -> None:
    """Callbacks to one host reuse a kept connection; another host name, even at the same
    address, gets connections of its own (never one opened, or a TLS session made, for
    another host)."""
    fake_dns({"hooks-a.test": ["127.0.0.1"], "hooks-b.test": ["127.0.0.1"]})
    for host in ("hooks-a.test", "hooks-a.test", "hooks-b.test", "hooks-b.test"):
        result = _send(receiver, url=f"http://{host}:{receiver.port}/hook")
        assert result.ok, result.error
    a1, a2, b1, b2 = (seen.client_port for seen in receiver.requests)
    assert a1 == a2 and b1 == b2 and a1 != b1
    assert [seen.headers["Host"] for seen in receiver.requests[1:3]] == [f"hooks-a.test:{receiver.port}",
                                                                        f"hooks-b.test:{receiver.port}"]  # fmt: skip


BLOCKED = [
    "http://127.0.0.1/",
    "http://localhost/",
    "http://10.1.2.3/",
    "http://192.168.0.1/",
    "http://172.16.0.1/",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://2130706433/",  # decimal 127.0.0.1
    "http://0177.0.0.1/",  # octal
    "http://0x7f000001/",  # hex
    "http://0xa9fea9fe/",  # hex 169.254.169.254
    "http://127.1/",
    "http://0.0.0.0/",
    "http://0/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://224.0.0.1/",  # multicast
    "http://255.255.255.255/",
    "ftp://example.com/",
    "file:///etc/passwd",
    "gopher://example.com/",
    "http://user:pass@example.com/",
    "http://user@example.com/",
    "http:///no-host",
]


@pytest.mark.parametrize("url", BLOCKED)
def test_blocked_urls(url: str) -> None:
    with pytest.raises(Blocked):
        check_url(url, allow_private=False)
    result = deliver(url=url, msg_id="m", body=BODY, secrets=[SECRET], allow_private=False)
    assert (result.ok, result.status_code) == (False, None)
    assert result.error is not None and result.error.startswith("blocked: ")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "http://user:pass@example.com/",
    ],
)
def test_scheme_and_credentials_blocked_even_when_private_allowed(url: str) -> None:
    with pytest.raises(Blocked):
        check_url(url, allow_private=True)


def test_private_allowed_when_asked() -> None:
    for url in ("http://127.0.0.1:9/", "http://10.1.2.3/", "http://[::1]/", "http://localhost/"):
        check_url(url, allow_private=True)


def test_block_messages_are_readable(fake_dns: Callable[..., list[str]]) -> None:
    fake_dns({"hooks.example.com": ["10.0.0.5"]})
    cases = {
        "http://10.0.0.1/": "10.0.0.1 is a private address",
        "http://169.254.169.254/": "169.254.169.254 is a link-local (cloud metadata) address",
        "http://2130706433/": "2130706433 (= 127.0.0.1) is a loopback address",
        "https://hooks.example.com/cb": "hooks.example.com resolves to 10.0.0.5, which is a private address",
    }
    for url, message in cases.items():
        with pytest.raises(Blocked) as info:
            check_url(url, allow_private=False)
        assert str(info.value) == message


def test_public_name_resolving_to_private_is_blocked(receiver: Receiver, fake_dns: Callable[..., list[str]]) -> None:
    fake_dns({"hooks.example.com": ["10.0.0.5"], "mixed.example.com": ["93.184.216.34", "::1"]})
    for host in ("hooks.example.com", "mixed.example.com"):
        with pytest.raises(Blocked, match=host):
            check_url(f"https://{host}/cb", allow_private=False)
        result = deliver(url=f"https://{host}/cb", msg_id="m", body=BODY, secrets=[SECRET], allow_private=False)
        assert result.error is not None and result.error.startswith(f"blocked: {host} resolves")
    # Public answers pass.
    fake_dns({"public.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]})
    check_url("https://public.example.com/cb", allow_private=False)
    check_url("http://8.8.8.8/", allow_private=False)


def test_unresolvable_name() -> None:
    with pytest.raises(Blocked, match="DNS lookup failed"):
        check_url("http://no-such-host.invalid/", allow_private=False)
    result = deliver(
        url="http://no-such-host.invalid/",
        msg_id="m",
        body=BODY,
        secrets=[SECRET],
        allow_private=False,
    )
    assert result.status_code is None and result.error is not None
    assert result.error.startswith("DNS lookup failed for no-such-host.invalid")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_connects_to_the_vetted_address_only(scheme: str, fake_dns: Callable[..., list[str]]) -> None:
    """DNS rebinding: the name resolves to a public address once, then to 127.0.0.1.

    The request must go to the address that was checked, carry the real name in Host and
    (https) in SNI, and the name must not be resolved a second time.
    """
    lookups = fake_dns({"rebind.example.com": lambda n: ["93.184.216.34"] if n == 0 else ["127.0.0.1"]})
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(204)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        result = deliver(
            url=f"{scheme}://rebind.example.com:8443/cb?x=1",
            msg_id="m",
            body=BODY,
            secrets=[SECRET],
            allow_private=False,
            client=client,
        )
    assert result.ok and result.status_code == 204
    [request] = sent
    assert request.url.host == "93.184.216.34"
    assert request.url.port == 8443 and request.url.raw_path == b"/cb?x=1"
    assert request.headers["host"] == "rebind.example.com:8443"
    assert request.headers["connection"] == "close"  # a caller's client may serve other hosts
    if scheme == "https":
        assert request.extensions["sni_hostname"] == "rebind.example.com"
    else:
        assert "sni_hostname" not in request.extensions
    assert lookups == ["rebind.example.com"]


# --------------------------------------------------------------------------- real TLS


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = require_tool("openssl", why="the TLS test makes its certificate with it")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=hooks.test",
            "-addext",
            "subjectAltName=DNS:hooks.test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.fixture
def tls_receiver(tls_cert: tuple[Path, Path]) -> Iterator[Receiver]:
    cert, key = tls_cert
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    r = _start("https", context)
    yield r
    _stop(r)


def test_https_to_pinned_ip_verifies_the_real_name(
    tls_receiver: Receiver, tls_cert: tuple[Path, Path], fake_dns: Callable[..., list[str]]
) -> None:
    fake_dns({"hooks.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"]})
    trust = ssl.create_default_context(cafile=str(tls_cert[0]))
    with httpx.Client(verify=trust) as client:
        good = _send(tls_receiver, url=f"https://hooks.test:{tls_receiver.port}/hook", client=client)
        assert good.ok, good.error
        host = {k.lower(): v for k, v in tls_receiver.requests[0].headers.items()}["host"]
        assert host == f"hooks.test:{tls_receiver.port}"
        # Same IP, other name: the certificate is checked against the name, so this fails.
        bad = _send(tls_receiver, url=f"https://evil.test:{tls_receiver.port}/hook", client=client)
    assert not bad.ok and bad.status_code is None
    assert bad.error is not None and bad.error.startswith("TLS certificate error")
    assert len(tls_receiver.requests) == 1


# --------------------------------------------------------------------------- retry schedule


def test_next_delay_follows_schedule_with_jitter() -> None:
    rng = random.Random(1234)
    schedule = STANDARD_RETRY_SCHEDULE
    for attempt in range(1, len(schedule)):
        delays = [next_delay_s(attempt, schedule=schedule, rng=rng) or 0.0 for _ in range(200)]
        base = schedule[attempt]
        assert all(0.9 * base <= d <= 1.1 * base for d in delays)
        assert max(delays) - min(delays) > 0.1 * base  # jitter is really applied
    assert next_delay_s(1, schedule=schedule) is not None  # default rng
    assert next_delay_s(len(schedule), schedule=schedule) is None  # dead letter
    assert next_delay_s(len(schedule) + 3, schedule=schedule, retry_after_s=5) is None
    with pytest.raises(ValueError):
        next_delay_s(0, schedule=schedule)


def test_next_delay_honours_retry_after() -> None:
    rng = random.Random(5)
    schedule = STANDARD_RETRY_SCHEDULE  # schedule[1] == 5 s
    assert next_delay_s(1, schedule=schedule, retry_after_s=7, rng=rng) == 7
    # A shorter Retry-After does not shorten the schedule.
    assert 4.5 <= next_delay_s(1, schedule=schedule, retry_after_s=1, rng=rng) <= 5.5  # type: ignore[operator]
    # Capped at 24 h.
    assert next_delay_s(1, schedule=schedule, retry_after_s=10**9, rng=rng) == 86400
    assert next_delay_s(1, schedule=schedule, retry_after_s=float("inf"), rng=rng) == 86400
    assert 4.5 <= next_delay_s(1, schedule=schedule, retry_after_s=float("nan"), rng=rng) <= 5.5  # type: ignore[operator]
