"""Slow and hostile video sources, and long compute, never hold up serving.

A ``video_uri`` is fetched and hashed on the ``fetch`` queue, which the worker serves
from a thread pool of its own, with no transaction open (the decoding child probes it);
the event is parked meanwhile. A download has an overall deadline (``VIDSIM_DOWNLOAD_DEADLINE_S``, short in
this test run: tests/conftest.py). Decoding and embedding run with no transaction open.
Through the live worker of tests/conftest.py (its main pool is one solo process) and a
real local HTTP server that drips its answers a byte at a time.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, func, select
from support.helpers import wait_until
from support.media import make_video, own_hue

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
    ``open_drips`` counts the drips in progress (``peak_drips``: the most at once); all
    stop when the server does."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.open_drips = self.peak_drips = 0
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
                    server.peak_drips = max(server.peak_drips, server.open_drips)
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
    files = [
        make_video(folder / f"warm-{i}.mp4", seconds=3, pattern=p) for i, p in enumerate(("testsrc2", "rgbtestsrc"))
    ]
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


def _wait_watching_transactions(done: Callable[[], bool], *, timeout_s: float) -> list[str]:
    """Waits until ``done()`` (or the timeout), meanwhile noting every backend of the test
    database that stays idle inside a transaction for more than 2 s."""
    stuck: list[str] = []
    until = time.monotonic() + timeout_s
    while not done() and time.monotonic() < until:
        rows = _pg_stat_activity(
            "datname = current_database() AND state LIKE 'idle in transaction%%'"
            " AND now() - state_change > interval '2 s'",
            (),
        )
        stuck += [f"pid {pid} {state} for {idle}: {query}" for pid, state, idle, query in rows]
        time.sleep(0.2)
    return stuck


def test_dripping_downloads_do_not_hold_up_warm_events(  # type: ignore[no-untyped-def]
    warm_library, receiver, settings, data_dir: Path
) -> None:
    """Four downloads that drip (two bodies, two header blocks: more than the worker has
    processes) do not hold up warm events published after them, nor a cold URL that
    answers at once, published next; each drip is answered with a readable error once
    the download deadline passes; no Postgres connection sits idle in a transaction
    meanwhile."""
    deadline_s = float(os.environ["VIDSIM_DOWNLOAD_DEADLINE_S"])  # short in tests/conftest.py
    # Content of its own (a hue of its own): the same bytes as another test's video would be
    # that video, already registered and embedded.
    cold = make_video(data_dir / "slow-sources" / f"cold-{uuid.uuid4().hex[:6]}.mp4", seconds=3, pattern="mandelbrot",
                      extra_vf=own_hue())  # fmt: skip
    with DripServer({cold.name: cold}) as server:
        tag = uuid.uuid4().hex[:6]
        drips = [
            publish_video_selected(video_uri=server.url(f"{kind}/{tag}-{i}.mp4"), callback_url=receiver.url)
            for kind in ("body", "head")
            for i in range(2)
        ]
        drips_sent = time.time()
        wait_until(lambda: server.open_drips, timeout_s=30, what="the downloads to start dripping")

        warm: dict[str, float] = {}
        for i in range(10):
            warm[publish_video_selected(video_id=warm_library[i % 2], callback_url=receiver.url, k=1)] = time.time()
        stuck = _wait_watching_transactions(lambda: set(warm) <= receiver.by_event().keys(), timeout_s=deadline_s)
        got = receiver.by_event()
        late = {e: round(got[e].at - sent, 1) if e in got else None for e, sent in warm.items()}
        assert all(e in got and got[e].at - sent < 10 for e, sent in warm.items()), f"warm answers (s): {late}"
        assert server.open_drips, "the warm events were answered while the drips went on"
        assert all(got[e].payload["error"] is None and got[e].payload["results"] for e in warm)
        # A download that does not drip is served meanwhile (fetched, then embedded and searched).
        cold_event = publish_video_selected(video_uri=server.url(f"file/{cold.name}"), callback_url=receiver.url)

        stuck += _wait_watching_transactions(
            lambda: set(drips) <= receiver.by_event().keys(), timeout_s=deadline_s + 30
        )
        assert stuck == [], stuck
        answers = {e: a for e, a in receiver.by_event().items() if e in drips}
        assert set(answers) == set(drips), f"drips answered: {sorted(answers)}"
        assert server.peak_drips == len(drips)  # all at once, none waiting on another
        for event_id in drips:
            body = answers[event_id].payload
            assert body["results"] == [] and f"did not finish within {deadline_s:g} s" in body["error"], body
            assert answers[event_id].at - drips_sent >= deadline_s
        cold_body = receiver.wait_for({cold_event}, timeout_s=120)[cold_event].payload
        assert cold_body["error"] is None and cold_body["results"], cold_body
    with session_scope() as s:
        for event_id in drips:
            ev = s.get_one(Event, event_id)
            assert ev.status == "failed" and ev.error == answers[event_id].payload["error"]
        query = s.get_one(Video, cold_body["query"]["video_id"])
        assert query.uri == server.url(f"file/{cold.name}") and query.in_library is False
    waits = sorted(got[e].at - sent for e, sent in warm.items())
    print(
        f"\n{len(drips)} dripping downloads: {len(warm)} warm events answered in {waits[0] * 1000:.0f}-"
        f"{waits[-1] * 1000:.0f} ms meanwhile; drips answered "
        f"{min(a.at for a in answers.values()) - drips_sent:.1f}-{max(a.at for a in answers.values()) - drips_sent:.1f}"
        f" s after publishing (deadline {deadline_s:g} s): {answers[drips[0]].payload['error']!r}"
    )


def test_embedding_holds_no_transaction_while_decoding(settings, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The embed task reads, commits, decodes and embeds with no connection held, then
    writes: seen from pg_stat_activity while the decoder and the encoder run."""
    import app.media.video as video_io
    import app.serve.recommend as recommend
    from workers.tasks import embed_video

    clip = make_video(data_dir / "slow-sources" / f"embed-{uuid.uuid4().hex[:6]}.mp4", seconds=2, pattern="smptebars",
                      extra_vf=own_hue())  # fmt: skip
    with session_scope() as s:
        # Not a library video: a rollout still embedding the library in the live worker
        # (an earlier module's) would otherwise embed it first, and this call skip it.
        video_id = register(s, str(clip), settings=settings, in_library=False).video_id

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

    real_stream, real_describe = video_io.stream_frames, recommend.describe_stream

    def stream_frames(*args: Any, **kwargs: Any) -> Any:
        observe("decoding")
        return real_stream(*args, **kwargs)

    def describe_stream(model: Any, chunks: Any, **kwargs: Any) -> Any:
        def watched() -> Any:
            for i, chunk in enumerate(chunks):
                if i == 0:  # the child decodes the next chunks meanwhile
                    observe("embedding")
                yield chunk

        return real_describe(model, watched(), **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(video_io, "stream_frames", stream_frames)
    mp.setattr(recommend, "describe_stream", describe_stream)
    try:
        embed_video.apply(args=[video_id]).get()  # the task's own code, in this process
    finally:
        mp.undo()
        event.remove(engine, "connect", remember_backend)
    assert ours, "the task used the database"
    assert seen == {"decoding": [], "embedding": []}, seen
    assert _embedded([video_id])


@pytest.mark.parametrize("kind", ["body", "head"])
def test_download_deadline_cuts_off_a_trickle(settings, kind: str) -> None:  # type: ignore[no-untyped-def]
    """A server trickling its body, or its headers (which no byte cap sees), is cut off at
    the deadline with a readable reason, and leaves no partial file behind."""
    from app.media.register import SourceError, download

    quick = settings.model_copy(update={"download_deadline_s": 1.5})
    with DripServer({}) as server:
        started = time.monotonic()
        with pytest.raises(SourceError, match=r"/x\.mp4: download did not finish within 1\.5 s$"):
            download(server.url(f"{kind}/x.mp4"), settings=quick)
        took = time.monotonic() - started
    assert 1.5 <= took < 5, took
    assert not list(quick.media_dir.glob("*.part"))


def test_worker_serves_fetch_from_threads_of_its_own(settings, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """`vidsim worker` runs the `fetch` queue in a second process with a pool of threads,
    beside the pool of the other queues; the two start together and stop together."""
    import signal
    import subprocess
    import sys

    from workers.process import FETCH_THREADS, worker_commands

    main, fetch = worker_commands("events,fetch,embed", pool="prefork", concurrency=2, beat=True)
    assert main.args[main.args.index("-Q") + 1] == "events,embed" and "--beat" in main.args and main.serves_metrics
    assert fetch.args[fetch.args.index("-Q") + 1] == "fetch" and "--beat" not in fetch.args
    assert fetch.args[fetch.args.index("--pool") + 1] == "threads" and not fetch.serves_metrics
    assert fetch.args[fetch.args.index("--concurrency") + 1] == str(FETCH_THREADS)
    assert "VIDSIM_METRICS_PORT" not in fetch.env({"VIDSIM_METRICS_PORT": "9100"})
    (alone,) = worker_commands("fetch", concurrency=32)
    assert alone.args[alone.args.index("--concurrency") + 1] == "32" and alone.serves_metrics

    log = data_dir / f"vidsim-worker-{uuid.uuid4().hex[:6]}.log"
    # Its own broker keys: it takes no message of this run's other workers.
    env = {**os.environ, "VIDSIM_BROKER_PREFIX": f"{settings.broker_prefix}cli-{uuid.uuid4().hex[:6]}:"}
    with open(log, "wb") as out:
        cli = subprocess.Popen([sys.executable, "-m", "scripts.cli", "worker", "--queues", "events,fetch", "--pool",
                                "solo"], stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        wait_until(lambda: log.read_bytes().count(b" ready.") == 2, timeout_s=90, what="both workers to be ready")
        text = log.read_text()
        assert "celery@" in text and "celery-fetch@" in text, text[-2000:]
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
    assert log.read_text().count("Warm shutdown") == 2
