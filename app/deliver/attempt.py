"""One delivery attempt of a signed callback, and the schedule of the next one.

This module knows nothing of Celery or the database. The caller stores every attempt and
schedules the next one with :func:`next_delay_s`; :func:`deliver` makes exactly one attempt
and never raises for network or HTTP problems.

The request follows the outbound policy (:mod:`app.media.addresses`, :mod:`app.media.http`):
the callback host's transport resolves and vets the host when it opens a connection and
connects to the vetted IP itself (with the real name in ``Host`` and in TLS SNI), so a
DNS answer that changes between the check and the connection (rebinding) cannot redirect
it, and a kept connection needs no lookup. A caller's own client (tests) is sent the
request at addresses vetted up front instead. Redirects are never followed, the response
body is read at most :data:`MAX_RESPONSE_BYTES`, and no cookies, proxies or ``.netrc``
from the environment are used.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from app.deliver.signing import sign
from app.logs import one_line
from app.media.addresses import Blocked, UnresolvableHost, check_url, parse_url, vet_url
from app.media.http import MAX_ADDRESSES_TRIED, VettingTransport, describe_transport_error, drain, parse_retry_after

__all__ = ["MAX_RESPONSE_BYTES", "DeliveryResult", "deliver", "next_delay_s"]

USER_AGENT = "vidsim"
MAX_RESPONSE_BYTES = 64 * 1024
MAX_RETRY_AFTER_S = 24 * 3600.0
# Status codes whose Retry-After we honour: 429 and 503 (RFC 9110), and 502/504, which
# Standard Webhooks also lists as "throttle" answers.
_RETRY_AFTER_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class DeliveryResult:
    ok: bool  # 2xx
    status_code: int | None  # None when no response (refused, timeout, blocked)
    error: str | None  # one readable line, e.g. 'HTTP 500', 'connection refused'
    retry_after_s: float | None  # from Retry-After (seconds or HTTP date) on 429/502/503/504
    disable: bool  # 410 Gone: the receiver asks us to stop
    duration_ms: float


# Callback hosts whose transport (and kept connections) a process holds at once; the one
# used least recently is closed to make room.
MAX_CLIENTS = 64
_transports: OrderedDict[tuple[bool, str, str, int | None], VettingTransport] = OrderedDict()
_transports_lock = threading.Lock()


def _transport_for(allow_private: bool, url: httpx.URL) -> VettingTransport:
    """A transport of its own per callback host (scheme, name, port), with keep-alive: a
    chat app receiving a stream of callbacks gets them on a few kept connections, not a
    new TCP (and TLS) connection each. One transport per host name means a kept
    connection never carries another host's callback, under the first host's TLS session.

    The request goes to the transport itself, not through an ``httpx.Client``: a client
    would only add what a callback never uses (redirect handling, auth, a cookie jar to
    fill and empty), and that took 0.2 of a warm event's 0.5 ms of HTTP CPU."""
    key = (allow_private, url.scheme, url.host, url.port)
    with _transports_lock:
        transport = _transports.get(key)
        if transport is not None:
            _transports.move_to_end(key)
            return transport
        transport = _transports[key] = VettingTransport(allow_private=allow_private, max_connections=20)
        evicted = _transports.popitem(last=False)[1] if len(_transports) > MAX_CLIENTS else None
    if evicted is not None:
        evicted.close()  # (a request still in flight on it fails, and is retried on schedule)
    return transport


def close_clients() -> None:
    """Closes every transport held for a callback host; the next attempts open new ones."""
    with _transports_lock:
        transports = list(_transports.values())
        _transports.clear()
    for transport in transports:
        transport.close()


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
    read/write; body reading also stops at the overall deadline. ``client`` (tests) may be
    any httpx client: the request still goes to the vetted address only, on a connection
    of its own. Without one, each callback host has a transport with kept connections.
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
        parsed, host = parse_url(url)
        if client is None:
            # The host's transport resolves and vets the name when it opens a connection,
            # trying its first addresses in turn: a kept connection costs no DNS lookup
            # (a slow resolver would hold every callback), and a rebinding answer is caught
            # there. An address written in the URL is vetted here.
            check_url(url, allow_private=allow_private, resolve=False)
            targets = [parsed]
        else:
            # A caller's client may not vet when connecting: send to vetted addresses only.
            addresses = vet_url(url, allow_private=allow_private).addresses[:MAX_ADDRESSES_TRIED]
            targets = [parsed.copy_with(host=str(ip)) for ip in addresses]
    except Blocked as exc:
        return result(error=f"blocked: {one_line(exc)}")
    except UnresolvableHost as exc:
        return result(error=one_line(exc))

    headers = {
        "Host": parsed.netloc.decode("ascii"),  # the real name (and port), not the IP
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Accept-Encoding": "identity",
        **signature_headers,
    }
    if client is not None:
        # A caller's client may be shared between hosts: never reuse a connection it
        # opened for another host name (and its TLS session).
        headers["Connection"] = "close"
    extensions: dict[str, Any] = {"timeout": httpx.Timeout(timeout_s).as_dict()}
    if parsed.scheme == "https":
        extensions["sni_hostname"] = host
    transport = _transport_for(allow_private, parsed) if client is None else None

    error = "no address to connect to"
    for target in targets:
        request = httpx.Request("POST", target, content=body, headers=headers, extensions=extensions)
        try:
            if transport is not None:
                response = transport.handle_request(request)  # a transport follows no redirects
                response.request = request
            else:
                assert client is not None
                response = client.send(request, stream=True, follow_redirects=False)
        except Blocked as exc:  # vetted when connecting
            return result(error=f"blocked: {one_line(exc)}")
        except UnresolvableHost as exc:
            return result(error=one_line(exc))
        except httpx.ConnectError as exc:
            error = describe_transport_error(exc, timeout_s=timeout_s)
            if time.monotonic() < deadline:
                continue  # try the host's next address
            break
        except httpx.TransportError as exc:
            return result(error=describe_transport_error(exc, timeout_s=timeout_s))
        except httpx.HTTPError as exc:
            return result(error=f"{type(exc).__name__}: {one_line(exc)}")
        try:
            drain(response, max_bytes=MAX_RESPONSE_BYTES, deadline=deadline)
        finally:
            response.close()

        status = response.status_code
        retry_after = (
            parse_retry_after(response.headers.get("Retry-After")) if status in _RETRY_AFTER_STATUSES else None
        )
        if 200 <= status < 300:
            return result(ok=True, status=status)
        if 300 <= status < 400:
            return result(status=status, error=f"redirect (HTTP {status}) not followed")
        return result(status=status, error=f"HTTP {status}", retry_after=retry_after, disable=status == 410)
    return result(error=error)


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
