"""Slow and hostile video sources, and long compute, never hold up serving.

A ``video_uri`` is fetched, hashed and probed on the ``fetch`` queue, which the worker
serves from a thread pool of its own, with no transaction open; the event is parked
meanwhile. A download has an overall deadline (``VIDSIM_DOWNLOAD_DEADLINE_S``, short in
this test run: tests/conftest.py). Decoding and embedding run with no transaction open.
Through the live worker of tests/conftest.py (its main pool is one solo process) and a
real local HTTP server that drips its answers a byte at a time.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, func, select
from support.helpers import wait_until
from support.media import make_video

from app.db import get_engine, session_scope
from app.learn.registry import active_model
from app.media.register import register
from app.models import Embedding, Event, Video
from workers.publish import publish_video_selected

DRIP_EVERY_S = 0.5


class DripServer:
    """A local HTTP server: ``/body/...`` sends its headers, then a byte of body every
    DRIP_EVERY_S; ``/head/...`` sends its status line, then a byte of headers every
    DRIP_EVERY_S (the headers never end); ``/file/NAME`` sends a real file at once.
    ``open_drips`` counts the drips in progress; all stop when the server does."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.open_drips = 0
        self.drips_seen: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def __enter__(self) -> DripServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                kind, _, name = self.path.strip("/").partition("/")
                if kind == "file":
                    data = server.files[name].read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "video/mp4")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                with server._lock:
                    server.open_drips += 1
                    server.drips_seen.append(self.path)
                try:
                    if kind == "body":
                        self.send_response(200)
                        self.send_header("Content-Type", "video/mp4")
                        self.send_header("Content-Length", str(10**9))
                        self.end_headers()
                    else:
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                    while not server._stop.wait(DRIP_EVERY_S):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                except OSError:
                    pass  # the client gave up
                finally:
                    with server._lock:
                        server.open_drips -= 1
                    self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{path}"

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()


def _embedded(video_ids: list[int]) -> bool:
    with session_scope() as s:
        model = active_model(session=s)
        n = s.scalar(
            select(func.count()).where(Embedding.video_id.in_(video_ids), Embedding.model_version_id == model.id)
        )
        return n == len(video_ids)


@pytest.fixture(scope="module")
def warm_library(data_dir: Path, settings, worker) -> list[int]:  # type: ignore[no-untyped-def]
    """Two library videos, embedded by the worker."""
    folder = data_dir / "slow-sources"
    files = [make_video(folder / f"warm-{i}.mp4", seconds=3, pattern=p) for i, p in enumerate(("testsrc2", "rgbtestsrc"))]
    with session_scope() as s:
        ids = [register(s, str(f), settings=settings, collection="slow-sources").video_id for f in files]
    from workers.tasks import embed_video

    for video_id in ids:
        embed_video.delay(video_id)
    wait_until(lambda: _embedded(ids), timeout_s=240, what="the warm library to be embedded")
    return ids


def _pg_stat_activity(where: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Rows of pg_stat_activity (pid, state, time in that state, query), read on a
    connection of their own."""
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        return conn.execute(
            "SELECT pid, state, now() - state_change, left(query, 80) FROM pg_stat_activity WHERE " + where, params
        ).fetchall()


def _idle_in_transaction(*, longer_than_s: float) -> list[str]:
    """Backends of the test database idle inside a transaction for longer than ``longer_than_s``."""
    rows = _pg_stat_activity(
        "datname = current_database() AND state LIKE 'idle in transaction%%'"
        " AND now() - state_change > %s * interval '1 s'",
        (longer_than_s,),
    )
    return [f"pid {pid} {state} for {idle}: {query}" for pid, state, idle, query in rows]


def test_dripping_downloads_do_not_hold_up_warm_events(  # type: ignore[no-untyped-def]
    warm_library, receiver, settings, data_dir: Path
) -> None:
    """Four downloads that drip (two bodies, two header blocks: more than the worker has
    processes) do not hold up warm events published after them, nor a cold URL that
    answers at once; each drip is answered with a readable error once the download
    deadline passes; no Postgres connection sits idle in a transaction meanwhile."""
    deadline_s = float(os.environ["VIDSIM_DOWNLOAD_DEADLINE_S"])  # short in tests/conftest.py
    cold = make_video(data_dir / "slow-sources" / f"cold-{uuid.uuid4().hex[:6]}.mp4", seconds=3, pattern="mandelbrot")
    with DripServer({cold.name: cold}) as server:
        tag = uuid.uuid4().hex[:6]
        drips = [
            publish_video_selected(video_uri=server.url(f"{kind}/{tag}-{i}.mp4"), callback_url=receiver.url)
            for kind in ("body", "head")
            for i in range(2)
        ]
        drips_started = time.monotonic()
        wait_until(lambda: server.open_drips, timeout_s=30, what="the downloads to start dripping")

        warm: dict[str, float] = {}
        for i in range(10):
            warm[publish_video_selected(video_id=warm_library[i % 2], callback_url=receiver.url, k=1)] = time.time()
        cold_event = publish_video_selected(video_uri=server.url(f"file/{cold.name}"), callback_url=receiver.url)
        stuck: list[str] = []
        while not set(warm) <= receiver.by_event().keys() and time.monotonic() < drips_started + deadline_s:
            stuck += _idle_in_transaction(longer_than_s=2.0)
            time.sleep(0.2)
        got = receiver.by_event()
        late = {e: round(got[e].at - sent, 1) if e in got else None for e, sent in warm.items()}
        assert all(e in got and got[e].at - sent < 10 for e, sent in warm.items()), f"warm answers (s): {late}"
        assert server.open_drips == len(drips), "the warm events were answered while all the drips went on"
        assert got[next(iter(warm))].payload["error"] is None
        assert stuck == [], stuck

        answers = receiver.wait_for(set(drips), timeout_s=deadline_s + 30)
        assert set(answers) == set(drips), f"drips answered: {sorted(answers)}"
        for event_id in drips:
            body = answers[event_id].payload
            assert body["results"] == [] and f"did not finish within {deadline_s:g} s" in body["error"], body
            assert time.monotonic() - drips_started >= deadline_s
        cold_body = receiver.wait_for({cold_event}, timeout_s=120)[cold_event].payload
        assert cold_body["error"] is None and cold_body["results"], cold_body
    with session_scope() as s:
        for event_id in drips:
            ev = s.get_one(Event, event_id)
            assert ev.status == "failed" and ev.error == answers[event_id].payload["error"]
        query = s.get_one(Video, cold_body["query"]["video_id"])
        assert query.uri == server.url(f"file/{cold.name}") and query.in_library is False


def test_embedding_holds_no_transaction_while_decoding(settings, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The embed task reads, commits, decodes and embeds with no connection held, then
    writes: seen from pg_stat_activity while the decoder and the encoder run."""
    import app.media.video as video_io
    import app.serve.recommend as recommend
    from workers.tasks import embed_video

    clip = make_video(data_dir / "slow-sources" / f"embed-{uuid.uuid4().hex[:6]}.mp4", seconds=2, pattern="smptebars")
    with session_scope() as s:
        video_id = register(s, str(clip), settings=settings).video_id

    engine = get_engine()
    engine.dispose()  # every connection from here on is seen by the listener
    ours: set[int] = set()

    def remember_backend(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        with dbapi_conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            ours.add(cur.fetchone()[0])

    event.listen(engine, "connect", remember_backend)
    seen: dict[str, list[str]] = {}

    def observe(step: str) -> None:
        rows = _pg_stat_activity("pid = ANY(%s) AND state LIKE 'idle in transaction%%'", (list(ours),))
        seen[step] = [f"pid {pid}: {state} ({query})" for pid, state, _, query in rows] + (
            [f"{engine.pool.checkedout()} connection(s) checked out"] if engine.pool.checkedout() else []
        )

    real_sample, real_embed = video_io.sample_frames, recommend.embed_clips

    def sample_frames(*args: Any, **kwargs: Any) -> Any:
        observe("decoding")
        return real_sample(*args, **kwargs)

    def embed_clips(*args: Any, **kwargs: Any) -> Any:
        observe("embedding")
        return real_embed(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(video_io, "sample_frames", sample_frames)
    mp.setattr(recommend, "embed_clips", embed_clips)
    try:
        embed_video.apply(args=[video_id]).get()  # the task's own code, in this process
    finally:
        mp.undo()
        event.remove(engine, "connect", remember_backend)
    assert ours, "the task used the database"
    assert seen == {"decoding": [], "embedding": []}, seen
    assert _embedded([video_id])
