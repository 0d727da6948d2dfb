"""The one outbound HTTP policy: every request the service makes to a URL someone else
chose (callbacks, event video downloads, the crawler) goes through this module.

- **Vetted addresses only.** A host is resolved and every address it resolves to must be
  global (no loopback, private, link-local or cloud-metadata address, no IPv4-mapped,
  NAT64 or 6to4 form of one, no integer/octal/hex IPv4 spelling of one, no multicast,
  reserved, documentation or shared range) unless the caller passes ``allow_private``
  (settings ``callback_allow_private``, ``crawl_allow_private``). A host mixing public
  and internal answers is refused whole.
- **Checked when connecting.** :func:`vetted_client`'s transport resolves and vets the host
  at the moment it opens a connection and connects to the vetted IP itself, so a DNS
  answer that changes after an earlier check (rebinding) cannot reach an internal host.
  :func:`check_url` is the same check made up front, for a readable refusal before any
  work; it is advice, the connection is the guarantee.
- **No redirects, nothing from the environment.** Clients never follow redirects (a
  caller that wants them follows each hop itself, and each hop is vetted again when it
  connects), keep no cookies, and take no proxy, ``.netrc`` or certificate settings from
  the environment.
- **Caps.** :func:`iter_body` enforces a byte cap on the bytes actually received and a
  wall-clock deadline on every chunk; :func:`drain` reads and drops a bounded body.
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
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import httpcore
import httpx

from app.logs import one_line

__all__ = [
    "Blocked",
    "BodyTooLarge",
    "BodyTooSlow",
    "Target",
    "UnresolvableHost",
    "VettingTransport",
    "check_url",
    "describe_transport_error",
    "drain",
    "iter_body",
    "parse_retry_after",
    "parse_url",
    "vet_host",
    "vet_url",
    "vetted_client",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# A host's first addresses are tried in turn when connecting fails; more would only make
# an unreachable host slower to give up on.
MAX_ADDRESSES_TRIED = 3


class Blocked(Exception):
    """The URL or address may not be called (scheme, credentials, or a non-global address)."""


class UnresolvableHost(Exception):
    """The DNS lookup failed (transient; not a policy decision)."""


# --------------------------------------------------------------------------- addresses

# Special-purpose ranges that some Python versions still call "global" (ipaddress is
# patched from release to release); none of them is a host we should ever call.
_ALWAYS_NON_GLOBAL = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/96",  # IPv4-compatible (deprecated), :: and ::1
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "3fff::/20",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


def _non_global_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public address, or None when it is one."""
    if isinstance(ip, ipaddress.IPv6Address):
        # Addresses that carry an IPv4 address are judged by it (DNS64 answers included).
        embedded: ipaddress.IPv4Address | None = ip.ipv4_mapped or ip.sixtofour
        kind = "IPv4-mapped" if ip.ipv4_mapped else "6to4"
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            kind = "NAT64"
        if embedded is not None:
            reason = _non_global_reason(embedded)
            return None if reason is None else f"{reason} ({kind} {embedded})"
    if ip in _METADATA:
        return "a link-local (cloud metadata) address"
    for flag, what in (
        ("is_unspecified", "an unspecified"),
        ("is_loopback", "a loopback"),
        ("is_link_local", "a link-local"),
        ("is_multicast", "a multicast"),
        ("is_private", "a private"),
        ("is_site_local", "a site-local"),
        ("is_reserved", "a reserved"),
    ):
        if getattr(ip, flag, False):
            return f"{what} address"
    if not ip.is_global or any(ip in net for net in _ALWAYS_NON_GLOBAL):
        return "not a global address"
    return None


def _parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton() spellings: '127.1', '2130706433', '0x7f000001', '0177.0.0.1'."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = []
    for part in parts:
        try:
            if re.fullmatch(r"0[xX][0-9a-fA-F]+", part):
                numbers.append(int(part[2:], 16))
            elif re.fullmatch(r"0[0-7]*", part):
                numbers.append(int(part, 8))
            elif re.fullmatch(r"[1-9][0-9]*", part):
                numbers.append(int(part))
            else:
                return None
        except ValueError:  # absurdly long digit strings
            return None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = 0
    for n in head:
        value = value * 256 + n
    value = value * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(value)


def _literal_ip(host: str) -> IPAddress | None:
    """The address a host that is an IP literal (in any spelling the resolver accepts) names."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise Blocked(f"invalid IPv6 address {host!r}") from None
    return _parse_ipv4_loose(host)


def _resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UnresolvableHost(f"DNS lookup failed for {host}: {one_line(exc)}") from None
    addresses: dict[IPAddress, None] = {}
    for family, *_, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            addresses[ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])] = None
        except ValueError:
            continue
    if not addresses:
        raise UnresolvableHost(f"DNS lookup failed for {host}: no addresses")
    return tuple(addresses)


def vet_host(host: str, port: int, *, allow_private: bool) -> tuple[IPAddress, ...]:
    """The addresses ``host`` (a name or an IP literal) may be reached at, in resolver order.

    Raises :class:`Blocked` when any of them is not global (unless ``allow_private``) and
    :class:`UnresolvableHost` when the name does not resolve.
    """
    literal = _literal_ip(host)
    addresses = (literal,) if literal is not None else _resolve(host, port)
    if not allow_private:
        for ip in addresses:
            reason = _non_global_reason(ip)
            if reason is None:
                continue
            if literal is None:
                raise Blocked(f"{host} resolves to {ip}, which is {reason}")
            if isinstance(ip, ipaddress.IPv4Address) and str(ip) != host:  # '2130706433'
                raise Blocked(f"{host} (= {ip}) is {reason}")
            raise Blocked(f"{ip} is {reason}")
    return addresses


# --------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class Target:
    """A vetted URL: its parts, and the addresses its host may be reached at."""

    url: httpx.URL
    host: str  # ASCII (IDNA) host name or IP literal, without brackets
    addresses: tuple[IPAddress, ...]


def parse_url(url: str) -> tuple[httpx.URL, str]:
    """``url`` parsed, and its host (IDNA, without brackets). Raises :class:`Blocked` for
    what is never called, private addresses allowed or not: a scheme other than http(s),
    credentials in the URL, no host."""
    if not isinstance(url, str):
        raise Blocked("the URL must be a string")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise Blocked(f"invalid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise Blocked(f"scheme {parsed.scheme or '(none)'!r} is not http or https")
    if parsed.userinfo:
        raise Blocked("credentials in the URL are not allowed")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise Blocked("the URL has no host")
    return parsed, host


def vet_url(url: str, *, allow_private: bool) -> Target:
    """Parse, resolve and vet ``url``. Raises :class:`Blocked` or :class:`UnresolvableHost`."""
    parsed, host = parse_url(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return Target(url=parsed, host=host, addresses=vet_host(host, port, allow_private=allow_private))


def check_url(url: str, *, allow_private: bool) -> None:
    """Raise :class:`Blocked` unless ``url`` may be called.

    Refused: schemes other than http(s), a missing host, credentials in the URL, and, when
    ``allow_private`` is False, a host that is or resolves to any address that is not
    global (see the module docstring). A host that does not resolve is refused too. The
    connection is vetted again when it is opened, so passing here is advice, not a
    guarantee for later.
    """
    try:
        vet_url(url, allow_private=allow_private)
    except UnresolvableHost as exc:
        raise Blocked(str(exc)) from None


# --------------------------------------------------------------------------- clients


class _VettingBackend(httpcore.SyncBackend):
    """Resolves and vets the host when a connection is opened, then connects to the
    vetted IP (TLS still uses the host name for SNI and certificate checks)."""

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        # Blocked and UnresolvableHost are not httpcore errors: they reach the caller of
        # Client.send as they are, not as a transport error to retry.
        last: Exception | None = None
        for ip in vet_host(host, port, allow_private=self.allow_private)[:MAX_ADDRESSES_TRIED]:
            try:
                return super().connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        assert last is not None
        raise last


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Certificates from certifi, not from SSL_CERT_FILE & co.; loading them takes a while,
    # and one context serves every connection.
    return httpx.create_ssl_context(trust_env=False)


class VettingTransport(httpx.HTTPTransport):
    """An HTTP transport that connects only to vetted addresses (see the module docstring)."""

    def __init__(self, *, allow_private: bool, max_connections: int = 20, keepalive: bool = True) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False)
        # httpx offers no hook for the network backend; replace its pool with one using ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections // 2 if keepalive else 0,
            keepalive_expiry=5.0,
            network_backend=_VettingBackend(allow_private=allow_private),
        )


def vetted_client(
    *,
    allow_private: bool,
    headers: Mapping[str, str] | None = None,
    max_connections: int = 20,
    keepalive: bool = True,
) -> httpx.Client:
    """An httpx client under this policy: vetted connections, no redirects followed, no
    cookies kept, nothing taken from the environment. The caller closes it."""
    return httpx.Client(
        transport=VettingTransport(allow_private=allow_private, max_connections=max_connections, keepalive=keepalive),
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
