"""Signed HTTP callbacks (Standard Webhooks): sign, verify, and make one delivery attempt.

This module knows nothing of Celery or the database. The caller stores every attempt and
schedules the next one with :func:`next_delay_s`; :func:`deliver` makes exactly one attempt
and never raises for network or HTTP problems.

Signing follows Standard Webhooks 1.0 (https://www.standardwebhooks.com/): headers
``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` = ``v1,<base64 HMAC-SHA256 of
"id.timestamp.body">``, one per secret, space-separated, so that during a secret rotation a
receiver holding either the old or the new secret accepts the message. Secrets are
``whsec_`` + base64 of 24-64 random bytes (:func:`generate_secret`). A receiver checks a
delivery with :func:`verify` (or with the ``standardwebhooks`` package's ``Webhook.verify``)
and should also drop ids it has already processed: retries reuse the same ``webhook-id``.

SSRF: the target host is resolved here, every resolved address must be global (unless
``allow_private``), and the connection is made to the vetted IP itself, so a DNS answer that
changes between check and connect (rebinding) cannot redirect it. Redirects are never
followed, the response body is read at most :data:`MAX_RESPONSE_BYTES`, and cookies,
proxies and ``.netrc`` from the environment are ignored.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import hmac
import http.cookiejar
import ipaddress
import json
import math
import random
import re
import secrets as _secrets
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.logs import one_line

__all__ = [
    "MAX_RESPONSE_BYTES",
    "CallbackBlocked",
    "DeliveryResult",
    "WebhookVerificationError",
    "check_url",
    "deliver",
    "generate_secret",
    "next_delay_s",
    "sign",
    "verify",
]

USER_AGENT = "vidsim"
MAX_RESPONSE_BYTES = 64 * 1024
MAX_RETRY_AFTER_S = 24 * 3600.0
# Status codes whose Retry-After we honour: 429 and 503 (RFC 9110), and 502/504, which
# Standard Webhooks also lists as "throttle" answers.
_RETRY_AFTER_STATUSES = frozenset({429, 502, 503, 504})
_SECRET_PREFIX = "whsec_"
_MAX_ADDRESSES_TRIED = 3

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class DeliveryResult:
    ok: bool  # 2xx
    status_code: int | None  # None when no response (refused, timeout, blocked)
    error: str | None  # one readable line, e.g. 'HTTP 500', 'connection refused'
    retry_after_s: float | None  # from Retry-After (seconds or HTTP date) on 429/503
    disable: bool  # 410 Gone: the receiver asks us to stop
    duration_ms: float


class CallbackBlocked(Exception):
    """The callback URL may not be called (scheme, credentials, or a non-global address)."""


# --------------------------------------------------------------------------- signing


def generate_secret(nbytes: int = 32) -> str:
    """A fresh signing secret in Standard Webhooks form: ``whsec_`` + base64 of nbytes."""
    if not 24 <= nbytes <= 64:
        raise ValueError("a webhook secret should have 24 to 64 bytes")
    return _SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(nbytes)).decode("ascii")


def _secret_key(secret: str) -> bytes:
    """Decode ``whsec_<base64>`` strictly (the library silently drops non-base64 chars)."""
    bad = ValueError("a webhook secret must be 'whsec_' + base64 of 24-64 bytes")
    if not isinstance(secret, str):
        raise bad
    secret = secret.strip()
    if not secret.startswith(_SECRET_PREFIX):
        raise bad
    encoded = secret[len(_SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise bad from None
    if not 24 <= len(key) <= 64:
        raise bad
    return key


_MSG_ID_RE = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces (a header value)


def sign(*, secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers: webhook-id, webhook-timestamp, webhook-signature.

    The signature header holds ``v1,<b64>`` for each secret, space-separated, so a receiver
    holding either secret during a rotation accepts it. Raises ValueError for a malformed
    secret, an empty secret list, a bad id or timestamp, or a body that is not UTF-8.
    """
    if isinstance(secrets, str):
        raise ValueError("secrets must be a list of secrets, not one string")
    if not secrets:
        raise ValueError("at least one webhook secret is needed")
    if not isinstance(msg_id, str) or not _MSG_ID_RE.fullmatch(msg_id):
        raise ValueError("msg_id must be 1-256 printable ASCII characters without spaces")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise ValueError("timestamp must be a non-negative integer (Unix seconds)")
    try:
        text = body.decode("utf-8")  # the library signs str; JSON bodies are UTF-8
    except UnicodeDecodeError:
        raise ValueError("the callback body must be UTF-8 (JSON)") from None
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    signatures = dict.fromkeys(  # ordered, without duplicates
        Webhook(_secret_key(secret)).sign(msg_id, when, text) for secret in secrets
    )
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
    }


def verify(*, secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: int = 300) -> dict:
    """Check a received callback; return its parsed JSON object.

    Raises ``WebhookVerificationError`` (from ``standardwebhooks``, re-exported here) for
    missing headers, a timestamp more than ``tolerance_s`` away from now, a body or id that
    does not match any ``v1`` signature, or a body that is not a JSON object. ``headers``
    may be any mapping with ``items()`` (dict in any case, httpx.Headers,
    http.server's message). Replays within the tolerance window pass: remember the
    ``webhook-id`` values already processed and drop repeats.
    """
    key = _secret_key(secret)  # ValueError: the receiver's own configuration is wrong
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    msg_id = lowered.get("webhook-id", "")
    timestamp = lowered.get("webhook-timestamp", "").strip()
    signature_header = lowered.get("webhook-signature", "")
    if not (msg_id and timestamp and signature_header):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    if not re.fullmatch(r"[0-9]{1,12}", timestamp):
        raise WebhookVerificationError("invalid webhook-timestamp")
    sent_at = int(timestamp)
    now = time.time()
    if sent_at < now - tolerance_s:
        raise WebhookVerificationError("message timestamp too old")
    if sent_at > now + tolerance_s:
        raise WebhookVerificationError("message timestamp too new")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookVerificationError("body is not UTF-8") from None

    when = datetime.fromtimestamp(sent_at, tz=UTC)
    expected = base64.b64decode(Webhook(key).sign(msg_id, when, text).partition(",")[2])
    matched = False
    for token in signature_header.split():
        version, _, encoded = token.partition(",")
        if version != "v1":
            continue
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        # Keep comparing after a match: the time taken does not depend on which one matched.
        matched |= hmac.compare_digest(candidate, expected)
    if not matched:
        raise WebhookVerificationError("no matching signature found")
    try:
        payload = json.loads(text)
    except ValueError:
        raise WebhookVerificationError("body is not JSON") from None
    if not isinstance(payload, dict):
        raise WebhookVerificationError("body is not a JSON object")
    return payload


# --------------------------------------------------------------------------- SSRF checks

# Special-purpose ranges that some Python versions still call "global" (ipaddress is
# patched from release to release); these are never a webhook receiver.
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


class _ResolveError(Exception):
    """DNS lookup failed (transient; not a policy decision)."""


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    host: str  # ASCII (IDNA) host name or IP literal, without brackets
    addresses: tuple[IPAddress, ...]


def _parse_url(url: str) -> tuple[httpx.URL, str]:
    if not isinstance(url, str):
        raise CallbackBlocked("the callback URL must be a string")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise CallbackBlocked(f"invalid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise CallbackBlocked(f"scheme {parsed.scheme or '(none)'!r} is not http or https")
    if parsed.userinfo:
        raise CallbackBlocked("credentials in the URL are not allowed")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise CallbackBlocked("the URL has no host")
    return parsed, host


def _literal_ip(host: str) -> IPAddress | None:
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise CallbackBlocked(f"invalid IPv6 address {host!r}") from None
    return _parse_ipv4_loose(host)


def _resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise _ResolveError(f"DNS lookup failed for {host}: {one_line(exc)}") from None
    addresses: dict[IPAddress, None] = {}
    for family, *_, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            addresses[ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])] = None
        except ValueError:
            continue
    if not addresses:
        raise _ResolveError(f"DNS lookup failed for {host}: no addresses")
    return tuple(addresses)


def _target(url: str, *, allow_private: bool) -> _Target:
    """Parse, resolve and vet ``url``. Raises CallbackBlocked or _ResolveError."""
    parsed, host = _parse_url(url)
    literal = _literal_ip(host)
    if literal is not None:
        addresses: tuple[IPAddress, ...] = (literal,)
    else:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        addresses = _resolve(host, port)
    if not allow_private:
        for ip in addresses:
            reason = _non_global_reason(ip)
            if reason is not None:
                if literal is None:
                    raise CallbackBlocked(f"{host} resolves to {ip}, which is {reason}")
                if isinstance(ip, ipaddress.IPv4Address) and str(ip) != host:  # '2130706433'
                    raise CallbackBlocked(f"{host} (= {ip}) is {reason}")
                raise CallbackBlocked(f"{ip} is {reason}")
    return _Target(url=parsed, host=host, addresses=addresses)


def check_url(url: str, *, allow_private: bool) -> None:
    """Raise CallbackBlocked unless ``url`` may be called.

    Refused: schemes other than http(s), a missing host, credentials in the URL, and, when
    ``allow_private`` is False, a host that is or resolves to any address that is not global
    (loopback, private, link-local including the 169.254.169.254 metadata endpoint,
    IPv4-mapped/NAT64/6to4 forms of those, integer/octal/hex IPv4 spellings, 0.0.0.0,
    multicast, reserved, documentation and shared ranges). A host that does not resolve is
    refused too. :func:`deliver` repeats the check at connect time and connects to the
    vetted address, so passing here is advice, not a guarantee for later.
    """
    try:
        _target(url, allow_private=allow_private)
    except _ResolveError as exc:
        raise CallbackBlocked(str(exc)) from None


# --------------------------------------------------------------------------- delivery


@functools.cache
def _default_client() -> httpx.Client:
    # No keep-alive: the pool is keyed by the IP we connect to, so a kept connection could
    # carry another host's callback under the first host's TLS session. No cookies, no
    # proxies or .netrc from the environment.
    return httpx.Client(
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=0),
        cookies=http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),
    )


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _describe_transport_error(exc: httpx.TransportError, timeout_s: float) -> str:
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
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"protocol error: {one_line(exc)}"
    return f"{type(exc).__name__}: {one_line(exc)}"


def _parse_retry_after(value: str | None) -> float | None:
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


def _read_capped(response: httpx.Response, deadline: float) -> None:
    """Read (and drop) at most MAX_RESPONSE_BYTES of the body, stopping at the deadline."""
    received = 0
    try:
        for chunk in response.iter_raw():
            received += len(chunk)
            if received >= MAX_RESPONSE_BYTES or time.monotonic() >= deadline:
                break
    except (httpx.HTTPError, httpx.StreamError):  # StreamError: already read (MockTransport)
        pass  # the status line is what counts


def deliver(
    *,
    url: str,
    msg_id: str,
    body: bytes,
    secrets: list[str],
    allow_private: bool,
    timeout_s: float = 15.0,
    client: httpx.Client | None = None,
) -> DeliveryResult:
    """One attempt: POST ``body`` with fresh signature headers; never raises for network
    or HTTP problems (it does raise ValueError for bad secrets / id / body: configuration).

    2xx is success; 3xx is a failure (redirects are never followed); 410 sets ``disable``;
    429/502/503/504 report ``Retry-After``. ``timeout_s`` applies to connecting and to each
    read/write; body reading also stops at the overall deadline.
    """
    started = time.monotonic()
    deadline = started + timeout_s

    def result(
        *,
        ok: bool = False,
        status: int | None = None,
        error: str | None = None,
        retry_after: float | None = None,
        disable: bool = False,
    ) -> DeliveryResult:
        return DeliveryResult(
            ok=ok,
            status_code=status,
            error=error,
            retry_after_s=retry_after,
            disable=disable,
            duration_ms=(time.monotonic() - started) * 1000.0,
        )

    signature_headers = sign(secrets=secrets, msg_id=msg_id, timestamp=int(time.time()), body=body)
    try:
        target = _target(url, allow_private=allow_private)
    except CallbackBlocked as exc:
        return result(error=f"blocked: {one_line(exc)}")
    except _ResolveError as exc:
        return result(error=one_line(exc))

    http_client = client if client is not None else _default_client()
    headers = {
        "Host": target.url.netloc.decode("ascii"),  # the real name (and port), not the IP
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Accept-Encoding": "identity",
        "Connection": "close",  # never reuse a connection opened for another host name
        **signature_headers,
    }
    extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}

    error = "no address to connect to"
    for ip in target.addresses[:_MAX_ADDRESSES_TRIED]:
        request = http_client.build_request(
            "POST",
            target.url.copy_with(host=str(ip)),  # connect to the vetted address only
            content=body,
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            extensions=extensions,
        )
        try:
            response = http_client.send(request, stream=True, follow_redirects=False)
        except httpx.ConnectError as exc:
            error = _describe_transport_error(exc, timeout_s)
            if time.monotonic() < deadline:
                continue  # try the host's next address
            break
        except httpx.TransportError as exc:
            return result(error=_describe_transport_error(exc, timeout_s))
        except httpx.HTTPError as exc:
            return result(error=f"{type(exc).__name__}: {one_line(exc)}")
        try:
            _read_capped(response, deadline)
        finally:
            response.close()

        status = response.status_code
        retry_after = (
            _parse_retry_after(response.headers.get("Retry-After")) if status in _RETRY_AFTER_STATUSES else None
        )
        if 200 <= status < 300:
            return result(ok=True, status=status)
        if 300 <= status < 400:
            return result(status=status, error=f"redirect (HTTP {status}) not followed")
        return result(status=status, error=f"HTTP {status}", retry_after=retry_after, disable=status == 410)
    return result(error=error)


# --------------------------------------------------------------------------- retries

_RNG = random.Random()


def next_delay_s(
    attempt: int,
    *,
    schedule: Sequence[float],
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``; None when the schedule is exhausted.

    ``attempt`` counts from 1 (the attempt that just failed). ``schedule[i]`` is the delay
    before attempt ``i + 1`` (Standard Webhooks: 0, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h,
    20 h, 24 h), so ``len(schedule)`` is the total number of attempts. The delay gets +-10 %
    jitter and is at least ``retry_after_s`` (itself capped at 24 h) when given.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError("attempt counts from 1")
    if attempt >= len(schedule):
        return None
    base = max(0.0, float(schedule[attempt]))
    delay = base * (rng or _RNG).uniform(0.9, 1.1)
    if retry_after_s is not None and not math.isnan(retry_after_s) and retry_after_s > 0:
        delay = max(delay, min(float(retry_after_s), MAX_RETRY_AFTER_S))
    return delay
