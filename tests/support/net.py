"""Network kits for the outbound-policy tests: a canary that records every connection
made to it, and fake DNS answers for public names (the outside internet, faked)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import pytest

DnsTable = dict[str, list[str] | Callable[[int], list[str]]]


class Canary:
    """Listening sockets on 127.0.0.1 and ::1 that record every connection made to them:
    a refused request must never reach one."""

    def __init__(self) -> None:
        self.port = 0
        self.connections: list[str] = []
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()

    def __enter__(self) -> Canary:
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        v4.bind(("127.0.0.1", 0))
        self.port = v4.getsockname()[1]
        self._socks.append(v4)
        try:
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.bind(("::1", self.port))
            self._socks.append(v6)
        except OSError:
            pass  # no IPv6 loopback here
        for sock in self._socks:
            sock.listen(16)
            sock.settimeout(0.2)
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        return self

    def _accept(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections.append(str(addr))
            conn.close()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for sock in self._socks:
            sock.close()


def install_fake_dns(monkeypatch: pytest.MonkeyPatch, table: DnsTable) -> list[str]:
    """Make chosen names resolve to chosen addresses, in this process.

    ``install_fake_dns(monkeypatch, {"hooks.example.com": ["10.0.0.5"]})``; a value may
    also be a callable taking the call number (0, 1, ...) and returning the addresses
    (a rebinding resolver). Returns the list of names looked up, in order. Other names
    (and IP literals) resolve for real.
    """
    real = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host not in table:
            return real(host, port, *args, **kwargs)
        entry = table[host]
        addresses = entry(lookups.count(host)) if callable(entry) else entry
        lookups.append(host)
        port = int(port or 0)
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def refuse_egress(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No connection from this process leaves the machine: a connect to an address
    outside the loopback range fails as refused, and is recorded (the addresses a faked
    public name resolves to are never really dialled). Returns the refused targets."""
    import ipaddress

    refused: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def outside(address: object) -> bool:
        if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
            return False  # a Unix socket path
        try:
            return not ipaddress.ip_address(address[0].split("%")[0]).is_loopback
        except ValueError:
            return False  # a name: resolved (through the fake DNS) before a real connect

    def connect(self: socket.socket, address: object) -> None:
        if outside(address):
            refused.append(str(address))
            raise ConnectionRefusedError(f"test refused a connection leaving the machine: {address}")
        real_connect(self, address)  # type: ignore[arg-type]

    def connect_ex(self: socket.socket, address: object) -> int:
        if outside(address):
            refused.append(str(address))
            return 111  # ECONNREFUSED
        return real_connect_ex(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return refused
