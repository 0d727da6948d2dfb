"""Which URLs and IP addresses the service may call (its protection against SSRF).

A URL must be http(s), name a host and carry no credentials. Its host is resolved, and
every address it resolves to must be global: no loopback, private, link-local or
cloud-metadata address, no IPv4-mapped, NAT64 or 6to4 form of one, no integer, octal or
hex IPv4 spelling of one, no multicast, reserved, documentation or shared range, unless the
caller passes ``allow_private`` (settings ``callback_allow_private``,
``crawl_allow_private``). A host mixing public and internal answers is refused whole.

These are the rules; :mod:`app.media.http` applies them to every connection it opens.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass

import httpx

from app.logs import one_line

__all__ = [
    "Blocked",
    "IPAddress",
    "Target",
    "UnresolvableHost",
    "check_url",
    "parse_url",
    "vet_host",
    "vet_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
    return _parse_url(url)


# A callback URL is parsed on every attempt, and parsing took a fifth of an attempt's CPU;
# the answer depends on the string alone (a refusal is raised again, not kept).
@functools.lru_cache(maxsize=1024)
def _parse_url(url: str) -> tuple[httpx.URL, str]:
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


def check_url(url: str, *, allow_private: bool, resolve: bool = True) -> None:
    """Raise :class:`Blocked` unless ``url`` may be called.

    Refused: schemes other than http(s), a missing host, credentials in the URL, and, when
    ``allow_private`` is False, a host that is or resolves to any address that is not
    global (see the module docstring). A host that does not resolve is refused too. The
    connection is vetted again when it is opened, so passing here is advice, not a
    guarantee for later. With ``resolve=False`` nothing is looked up (a lookup takes as
    long as the name's DNS servers make it): a host spelled as an IP address is vetted,
    a name only when connecting.
    """
    try:
        if resolve:
            vet_url(url, allow_private=allow_private)
            return
        parsed, host = parse_url(url)
        if _literal_ip(host) is not None:
            vet_host(host, parsed.port or 0, allow_private=allow_private)
    except UnresolvableHost as exc:
        raise Blocked(str(exc)) from None
