"""The one outbound HTTP client: every request the service makes to a URL someone else
chose (callbacks, event video downloads, the crawler) is sent through it.

- **Vetted addresses only, checked when connecting.** :func:`vetted_client`'s transport
  resolves the host at the moment it opens a connection, vets every address by
  :mod:`app.media.addresses`' rules and connects to the vetted IP itself, so a DNS answer
  that changes after an earlier check (rebinding) cannot reach an internal host.
  :func:`app.media.addresses.check_url`, made up front, gives a readable refusal before
  any work; the connection is the guarantee.
- **No redirects, nothing from the environment.** Clients never follow redirects (a
  caller that wants them follows each hop itself, and each hop is vetted again when it
  connects), keep no cookies, and take no proxy, ``.netrc`` or certificate settings from
  the environment.
- **Caps.** :func:`iter_body` enforces a byte cap on the bytes actually received and a
  wall-clock deadline on every chunk; a client made with a ``deadline`` times out every
  connect, write and read (headers included) once it passes; :func:`drain` reads and
  drops a bounded body.
- **Readable failures that leak nothing.** :func:`describe_transport_error` names what
  went wrong in one line without quoting what the other host sent (a protocol error from
  an internal service would otherwise carry its banner into a callback or an event's
  error). :func:`parse_retry_after` reads ``Retry-After``.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import http.cookiejar
import re
import ssl
import time
from collections.abc import Iterator, Mapping
from datetime import UTC
from typing import Any

import httpcore
import httpx

from app.logs import one_line
from app.media.addresses import vet_host

__all__ = [
    "MAX_ADDRESSES_TRIED",
    "BodyTooLarge",
    "BodyTooSlow",
    "VettingTransport",
    "describe_transport_error",
    "drain",
    "iter_body",
    "parse_retry_after",
    "vetted_client",
]

# A host's first addresses are tried in turn when connecting fails; more would only make
# an unreachable host slower to give up on.
MAX_ADDRESSES_TRIED = 3


# --------------------------------------------------------------------------- clients


class _VettingBackend(httpcore.SyncBackend):
    """Resolves and vets the host when a connection is opened, then connects to the
    vetted IP (TLS still uses the host name for SNI and certificate checks). With a
    ``deadline``, its connections give up when it passes (:class:`_DeadlineStream`)."""

    def __init__(self, *, allow_private: bool, deadline: float | None = None) -> None:
        self.allow_private = allow_private
        self.deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        # vet_host's Blocked and UnresolvableHost are not httpcore errors: they reach the
        # caller of Client.send as they are, not as a transport error to retry.
        last: Exception | None = None
        for ip in vet_host(host, port, allow_private=self.allow_private)[:MAX_ADDRESSES_TRIED]:
            try:
                wait = _until(self.deadline, timeout, httpcore.ConnectTimeout)
                stream = super().connect_tcp(str(ip), port, wait, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
                continue
            return stream if self.deadline is None else _DeadlineStream(stream, self.deadline)
        assert last is not None
        raise last


def _until(deadline: float | None, timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` cut to what is left before ``deadline``; raises ``expired`` once it passed."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection on which no read or write waits past ``deadline`` (time.monotonic()).

    Timeouts are per operation: a server that sends a byte just before each one expires
    (of the headers, which no body cap sees, or of the body) would hold a request for
    ever without this."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: float) -> None:
        self._stream, self._deadline = stream, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _until(self._deadline, timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _until(self._deadline, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        wait = _until(self._deadline, timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, wait), self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Certificates from certifi, not from SSL_CERT_FILE & co.; loading them takes a while,
    # and one context serves every connection.
    return httpx.create_ssl_context(trust_env=False)


class VettingTransport(httpx.HTTPTransport):
    """An HTTP transport that connects only to vetted addresses (see the module docstring)."""

    def __init__(
        self, *, allow_private: bool, max_connections: int = 20, keepalive: bool = True, deadline: float | None = None
    ) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False)
        # httpx offers no hook for the network backend; replace its pool with one using ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections // 2 if keepalive else 0,
            keepalive_expiry=5.0,
            network_backend=_VettingBackend(allow_private=allow_private, deadline=deadline),
        )


def vetted_client(
    *,
    allow_private: bool,
    headers: Mapping[str, str] | None = None,
    max_connections: int = 20,
    keepalive: bool = True,
    deadline: float | None = None,
) -> httpx.Client:
    """An httpx client under this policy: vetted connections, no redirects followed, no
    cookies kept, nothing taken from the environment. The caller closes it.

    With ``deadline`` (``time.monotonic()``), nothing it does waits past it: connecting,
    sending, reading the headers and the body each time out when it passes (httpx's own
    timeouts are per operation, so a server that trickles bytes would outlast them)."""
    return httpx.Client(
        transport=VettingTransport(
            allow_private=allow_private, max_connections=max_connections, keepalive=keepalive, deadline=deadline
        ),
        follow_redirects=False,
        trust_env=False,
        headers=headers,
        cookies=http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),
    )


# --------------------------------------------------------------------------- bodies


class BodyTooLarge(Exception):
    """More bytes arrived than the cap allows."""


class BodyTooSlow(Exception):
    """The body was still arriving when its wall-clock deadline passed."""


def iter_body(
    response: httpx.Response, *, max_bytes: int | None = None, deadline: float | None = None, raw: bool = False
) -> Iterator[bytes]:
    """A streamed response's body in chunks as they arrive (decoded unless ``raw``).

    Raises :class:`BodyTooLarge` before handing over a chunk that would take the bytes
    received past ``max_bytes`` (what arrives counts, not Content-Length), and
    :class:`BodyTooSlow` when ``deadline`` (``time.monotonic()``) has passed, checked after
    every chunk. Give the request a read timeout no longer than what remains before the
    deadline, so that a server which stops sending altogether is cut off too.
    """
    received = 0
    for chunk in response.iter_raw() if raw else response.iter_bytes():  # as it arrives
        received += len(chunk)
        if max_bytes is not None and received > max_bytes:
            raise BodyTooLarge(f"more than {max_bytes} bytes received")
        yield chunk
        if deadline is not None and time.monotonic() > deadline:
            raise BodyTooSlow("the body took longer than its time cap")


def drain(response: httpx.Response, *, max_bytes: int, deadline: float) -> None:
    """Read and drop at most about ``max_bytes`` of the body, stopping at the deadline; a
    body that breaks off is no error (the status line is what the caller wanted)."""
    # StreamError: the body was read already (httpx.MockTransport answers).
    with contextlib.suppress(BodyTooLarge, BodyTooSlow, httpx.HTTPError, httpx.StreamError):
        for _chunk in iter_body(response, max_bytes=max_bytes, deadline=deadline, raw=True):
            pass


# --------------------------------------------------------------------------- answers and errors


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` value (delay-seconds or an HTTP date; a date in the
    past is 0), or None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,15}", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def describe_transport_error(exc: Exception, *, timeout_s: float) -> str:
    """One line for an operator (and for a callback's or an event's error) saying why no
    answer came: 'timed out after 15 s', 'connection refused', 'TLS certificate error: ...',
    'protocol error: illegal status line', ...

    Protocol errors are named by their kind only: the parser quotes the bytes it choked
    on, and those are what the other host sent (an internal service's banner, say).
    """
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out after {timeout_s:g} s"
    chain = _causes(exc)
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "refused" in str(exc):
        return "connection refused"
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate error: {one_line(e.verify_message or e)}"
        if isinstance(e, ssl.SSLError):
            return f"TLS error: {one_line(e)}"
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed: {one_line(exc)}"
    if isinstance(exc, httpx.RemoteProtocolError | httpcore.RemoteProtocolError):
        return f"protocol error: {one_line(str(exc).split(':', 1)[0], limit=80)}"
    return f"{type(exc).__name__}: {one_line(exc)}"
