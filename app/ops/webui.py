"""``vidsim ui``: a small read-only web view of recent events and their recommendations.

The page is rendered from Postgres on each request (thumbnails are cached on disk)."""

from __future__ import annotations

import logging
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from app.config import Settings
from app.db import session_scope
from app.ops.report import write_results_page

logger = logging.getLogger(__name__)


def make_server(*, host: str, port: int, limit: int, settings: Settings) -> ThreadingHTTPServer:
    out_dir = (settings.data_dir / "ui").resolve()
    render_lock = threading.Lock()  # one render at a time: thumbnails are shared files

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                with render_lock, session_scope() as session:
                    page = write_results_page(
                        out_dir, session=session, settings=settings, limit=limit, title="vidsim: recent events"
                    )
                self._send(200, page.read_bytes(), "text/html; charset=utf-8")
            elif path.startswith("/thumbs/"):
                file = (out_dir / path.lstrip("/")).resolve()
                if file.is_relative_to(out_dir / "thumbs") and file.is_file():
                    self._send(200, file.read_bytes(), mimetypes.guess_type(file.name)[0] or "application/octet-stream")
                else:
                    self._send(404, b"not found", "text/plain")
            else:
                self._send(404, b"not found", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.info("ui: " + fmt, *args)

    return ThreadingHTTPServer((host, port), Handler)


def serve(*, host: str, port: int, limit: int, settings: Settings) -> None:
    server = make_server(host=host, port=port, limit=limit, settings=settings)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
