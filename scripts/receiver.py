"""A chat app's callback endpoint on a local port: verifies each callback's signature and
keeps what it received. Used by the demo, the benchmarks and the tests; the README shows
the same verification for a real receiver."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from app.deliver.signing import verify


@dataclass
class Received:
    webhook_id: str
    payload: dict[str, Any]
    at: float  # time.time() on arrival


@dataclass
class CallbackReceiver:
    """``with CallbackReceiver(secret) as rx: ...; rx.url``. ``respond`` may return another
    status code (and headers) to simulate a failing chat app."""

    secret: str
    respond: Callable[[dict[str, Any]], tuple[int, dict[str, str]]] | None = None
    received: list[Received] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def __enter__(self) -> CallbackReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as a chat app's web server does; an idle connection is closed
            # after longer than a sender keeps one (app.media.http: 5 s).
            protocol_version = "HTTP/1.1"
            timeout = 10

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    payload = verify(secret=receiver.secret, headers=dict(self.headers), body=body)
                except Exception as exc:  # any verification failure is a 401 to the sender
                    with receiver._cond:
                        receiver.rejected.append(f"{type(exc).__name__}: {exc}")
                    self._reply(401, {})
                    return
                status, headers = receiver.respond(payload) if receiver.respond else (200, {})
                if 200 <= status < 300:
                    with receiver._cond:
                        receiver.received.append(Received(self.headers["webhook-id"], payload, time.time()))
                        receiver._cond.notify_all()
                self._reply(status, headers)

            def _reply(self, status: int, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # an AF_INET server's address (typeshed allows bytes)
        return f"http://{host}:{port}/hooks/vidsim"

    def wait_for(self, event_ids: set[str], timeout_s: float) -> dict[str, Received]:
        """Blocks until a callback for every id arrived (or the timeout); first per id."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                got = self.by_event()
                if event_ids <= got.keys() or time.monotonic() >= deadline:
                    return {k: v for k, v in got.items() if k in event_ids}
                self._cond.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))

    def by_event(self) -> dict[str, Received]:
        out: dict[str, Received] = {}
        for item in self.received:
            out.setdefault(item.payload["event_id"], item)
        return out
