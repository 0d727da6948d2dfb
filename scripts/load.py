"""Open-loop load on the warm path: raw protocol messages (what a non-Python chat app
pushes, README "Publishing events") LPUSHed onto the events queue on a fixed schedule,
whatever the answers, at each of a set of rates, through the real path (Redis, a
default `vidsim worker` layout, Postgres, a local signed-callback receiver). Prints, in
one run:

- rate -> p50 / p95 / p99 / max event -> verified callback, beside what did not make it
  into the percentiles: events never called back within the drain timeout (lost) and
  events answered with an error (errored);
- CPU seconds of every vidsim worker process (psutil, the whole process tree) per event;
- the Celery round-trip floor beside it: a trivial task on the same broker, settings and
  pool, at the same rate, with its own latency and CPU per task;
- per-event work in the task itself, measured in this process (the tasks run eagerly,
  the broker left out): Postgres round trips (statements, BEGIN/COMMIT, connection
  checks), and CPU by phase (database, search, signing, HTTP, the rest) from a profile;

and writes the figures as JSON and a plot (latency vs rate, the CPU breakdown) as PNG.

    python -m scripts.load                                   # 10,25,50,100,150/s; 60 s at 100/s
    python -m scripts.load --rates 25,100 --duration 10 --headline-duration 20
    python -m scripts.load --no-worker                       # workers you already run (no CPU figures)

Warm events name library videos already embedded: a library of ``--library`` videos
with clustered random unit vectors for the active model and a built index (search cost
depends on the index, not on where the vectors came from).

Uses DATABASE_URL / REDIS_URL when set; otherwise a database ``vidsim_load`` on the local
Postgres and Redis database 12, with a broker key prefix of its own.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import json
import os
import pstats
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts.local_services import use_local_services

LOAD_DB = "vidsim_load"
# The compose default: one prefork worker (2 processes) for every queue but `fetch`,
# which gets a worker of its own in threads (workers/process.py), and beat.
DEFAULT_QUEUES = "events,fetch,callbacks,maintenance,crawl,embed"


def _defaults() -> None:
    """Point at the local services, in a database and key prefix of the load test's own."""
    use_local_services(LOAD_DB, VIDSIM_TORCH_THREADS="1")


# --------------------------------------------------------------------------- publishing


def raw_message(task: str, kwargs: dict[str, Any], *, queue: str) -> str:
    """A Celery protocol 2 message as a non-Python producer pushes it (README)."""
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return json.dumps(
        {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": task,
                "id": str(uuid.uuid4()),
                "root_id": None,
                "parent_id": None,
                "group": None,
                "retries": 0,
                "eta": None,
                "expires": None,
            },
            "properties": {
                "correlation_id": str(uuid.uuid4()),
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_tag": str(uuid.uuid4()),
                "body_encoding": "base64",
                "priority": 0,
                "delivery_info": {"exchange": "", "routing_key": queue},
            },
        }
    )


def open_loop(rate: float, duration_s: float, push: Any) -> tuple[dict[int, float], float]:
    """Calls ``push(i)`` for i = 0.. on a fixed schedule of ``rate`` per second for
    ``duration_s``, late calls caught up at once (never waiting for answers); returns
    when each was pushed (time.time()) and how long publishing took."""
    sent: dict[int, float] = {}
    n = int(rate * duration_s)
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent[i] = time.time()
        push(i)
    return sent, time.monotonic() - start


# --------------------------------------------------------------------------- figures


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Phase:
    """One fixed-rate run and what it measured. Percentiles are of the events answered
    without an error; ``lost`` and ``errored`` are the others, counted, never dropped."""

    rate: float  # events per second asked for
    duration_s: float
    backlog_at_start: int = 0  # events a slower run before left queued
    published: int = 0
    publish_rate: float = 0.0  # achieved
    answered: int = 0  # verified callbacks without an error
    errored: int = 0  # verified callbacks that carry an error
    lost: int = 0  # no callback within the drain timeout
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    drain_s: float | None = None  # from the last publish to the last callback
    cpu_s: float | None = None  # worker process tree, publishing start to drained
    cpu_ms_per_event: float | None = None  # per event answered (with or without an error)
    errors: list[str] = field(default_factory=list)  # a few of the error messages

    def set_latencies(self, latencies: list[float]) -> None:
        self.p50_ms, self.p95_ms, self.p99_ms, self.max_ms = (
            None if v is None else round(v, 1) for v in (pct(latencies, p) for p in (50, 95, 99, 100))
        )


class ProcessTreeCPU:
    """CPU seconds (user + system) of processes and all their descendants, psutil."""

    def __init__(self, pids: list[int]) -> None:
        import psutil

        self._roots = [psutil.Process(pid) for pid in pids]
        self._start = self._times()

    def _times(self) -> dict[int, float]:
        import psutil

        out: dict[int, float] = {}
        for root in self._roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        t = proc.cpu_times()
                        out[proc.pid] = t.user + t.system
        return out

    def reset(self) -> None:
        self._start = self._times()

    def used_s(self) -> float:
        """Since the last reset; a process started since counts whole (a pool process
        replaced meanwhile loses what it used after the last reading)."""
        now = self._times()
        return sum(now[pid] - self._start.get(pid, 0.0) for pid in now)


def run_phase(
    rate: float,
    duration_s: float,
    *,
    library: list[int],
    receiver: Any,
    redis: Any,
    queue_key: str,
    drain_timeout_s: float,
    cpu: ProcessTreeCPU | None,
) -> Phase:
    """Warm events at ``rate`` for ``duration_s``, open loop, then the callbacks."""
    phase = Phase(rate=rate, duration_s=duration_s, backlog_at_start=redis.llen(queue_key))
    tag = uuid.uuid4().hex[:8]
    ids = [f"load-{tag}-{i}" for i in range(int(rate * duration_s))]

    def push(i: int) -> None:
        event = {"event_id": ids[i], "video_id": random.choice(library), "callback_url": receiver.url}
        redis.lpush(queue_key, raw_message("vidsim.video_selected", {"event": event}, queue="events"))

    if cpu is not None:
        cpu.reset()
    sent, publish_s = open_loop(rate, duration_s, push)
    stopped_at = time.time()
    got = receiver.wait_for(set(ids), timeout_s=drain_timeout_s)
    if cpu is not None:
        phase.cpu_s = round(cpu.used_s(), 2)
    phase.published, phase.publish_rate = len(ids), round(len(ids) / publish_s, 1)
    latencies = []
    for i, event_id in enumerate(ids):
        answer = got.get(event_id)
        if answer is None:
            phase.lost += 1
        elif answer.payload.get("error"):
            phase.errored += 1
            if len(phase.errors) < 3:
                phase.errors.append(str(answer.payload["error"])[:200])
        else:
            latencies.append((answer.at - sent[i]) * 1000)
    phase.answered = len(latencies)
    phase.set_latencies(latencies)
    if got:
        phase.drain_s = round(max(0.0, max(r.at for r in got.values()) - stopped_at), 2)
    if phase.cpu_s is not None and phase.answered + phase.errored:
        # Per event answered: a lost event's work may not have been done.
        phase.cpu_ms_per_event = round(phase.cpu_s / (phase.answered + phase.errored) * 1000, 2)
    return phase


# --------------------------------------------------------------------------- the floor

# The floor's task: a trivial Celery task on the same broker, with vidsim's settings (late
# acks, prefetch 1, JSON, no results) and pool, that tells this process it ran.
FLOOR_APP = "scripts.load:floor_app"
FLOOR_QUEUE = "floor"
FLOOR_DONE = "floor:done"


def _make_floor_app() -> Any:
    from celery import Celery
    from kombu import Exchange, Queue

    from workers.app import celery_app

    app = Celery("vidsim-floor")
    keep = (
        "broker_url",
        "broker_transport",
        "broker_transport_options",
        "task_serializer",
        "accept_content",
        "task_ignore_result",
        "result_backend",
        "task_acks_late",
        "worker_prefetch_multiplier",
        "worker_hijack_root_logger",
        "task_reject_on_worker_lost",
    )
    app.conf.update({key: celery_app.conf[key] for key in keep})
    app.conf.task_queues = [Queue(FLOOR_QUEUE, Exchange(FLOOR_QUEUE, type="direct"), routing_key=FLOOR_QUEUE)]
    app.conf.task_default_queue = FLOOR_QUEUE

    @app.task(name="floor.done")
    def done(token: str) -> None:
        from redis import Redis

        from app.config import get_settings

        settings = get_settings()
        client = _floor_redis.get("client") or Redis.from_url(settings.redis_url or "")
        _floor_redis["client"] = client
        client.lpush(settings.broker_prefix + FLOOR_DONE, f"{token} {time.time()}")

    return app


_floor_redis: dict[str, Any] = {}
floor_app = _make_floor_app() if os.environ.get("VIDSIM_LOAD_FLOOR") else None


def measure_floor(rate: float, duration_s: float, *, work: Path, redis: Any, prefix: str, concurrency: int) -> Phase:
    """The Celery round trip alone: trivial tasks at ``rate``, open loop, on a prefork
    worker of ``concurrency`` processes (the events worker's pool)."""
    env = {**os.environ, "VIDSIM_LOAD_FLOOR": "1"}
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        FLOOR_APP,
        "worker",
        "-Q",
        FLOOR_QUEUE,
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "--without-mingle",
        "--without-gossip",
        "--loglevel",
        "WARNING",
    ]
    done_key = prefix + FLOOR_DONE
    redis.delete(done_key)
    log = open(work / "floor.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Ready when a first task comes back (the pool is up).
        redis.lpush(prefix + FLOOR_QUEUE, raw_message("floor.done", {"token": "ready"}, queue=FLOOR_QUEUE))
        if redis.brpop(done_key, timeout=60) is None:
            raise RuntimeError(f"the floor worker did not start: {(work / 'floor.log').read_text()[-2000:]}")
        cpu = ProcessTreeCPU([proc.pid])
        phase = Phase(rate=rate, duration_s=duration_s)

        def push(i: int) -> None:
            redis.lpush(prefix + FLOOR_QUEUE, raw_message("floor.done", {"token": str(i)}, queue=FLOOR_QUEUE))

        sent, publish_s = open_loop(rate, duration_s, push)
        arrived: dict[int, float] = {}
        deadline = time.monotonic() + 60
        while len(arrived) < len(sent) and time.monotonic() < deadline:
            item = redis.brpop(done_key, timeout=1)
            if item is not None:
                token, at = item[1].decode().split()
                arrived[int(token)] = float(at)
        phase.cpu_s = round(cpu.used_s(), 2)
        phase.published, phase.publish_rate = len(sent), round(len(sent) / publish_s, 1)
        phase.answered, phase.lost = len(arrived), len(sent) - len(arrived)
        phase.set_latencies([(arrived[i] - sent[i]) * 1000 for i in arrived])
        phase.cpu_ms_per_event = round(phase.cpu_s / max(1, phase.published) * 1000, 2)
        return phase
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


# --------------------------------------------------------------------------- per-event work

# Where a profiled function's own time goes, by the file it is in (first match wins).
PHASES = (
    ("signing", ("standardwebhooks", "hmac", "app/deliver/signing")),
    (
        "HTTP",
        (
            "httpx",
            "httpcore",
            "h11",
            "/socket.py",
            "/ssl.py",
            "app/media/http",
            "app/media/addresses",
            "app/deliver/attempt",
            "/selectors.py",
        ),
    ),
    ("search", ("usearch", "numpy", "app/index/")),
    (
        "database",
        (
            "sqlalchemy",
            "psycopg",
            "app/serve/queries",
            "app/models",
            "app/db.py",
            "app/deliver/outbox",
            "app/task_attempts",
        ),
    ),
    ("broker", ("celery", "kombu", "redis", "vine", "billiard")),
)


def _phase_of(filename: str) -> str:
    for phase, needles in PHASES:
        if any(needle in filename for needle in needles):
            return phase
    return "other"


@contextlib.contextmanager
def counted_round_trips() -> Iterator[dict[str, int]]:
    """Counts what this process sends Postgres, as libpq sees it (its protocol trace), so
    that SQL sent on a connection as it is counts as SQLAlchemy's does: round trips (each
    answered by a ReadyForQuery, connection checks on checkout included), and of them
    BEGIN, COMMIT or ROLLBACK, checks (the pings of ``app.db``'s check on checkout) and
    statements."""
    import tempfile

    from psycopg import pq
    from sqlalchemy import event

    from app.db import get_engine

    engine = get_engine()
    counts = {"statements": 0, "transactions": 0, "checkouts": 0, "checks": 0, "round_trips": 0}
    traced: dict[int, tuple[Any, Any]] = {}  # id(pgconn) -> (pgconn, trace file)

    def checkout(dbapi_connection: Any, record: Any, *_: Any) -> None:
        counts["checkouts"] += 1
        pinged = bool(record.info.get("pinged"))  # by app.db's listener, which runs first
        counts["checks"] += pinged
        pgconn = dbapi_connection.pgconn
        if id(pgconn) not in traced:
            counts["round_trips"] += pinged  # its check on this checkout came before the trace
            trace = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed once read, below)
            pgconn.trace(trace.fileno())
            pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            traced[id(pgconn)] = (pgconn, trace)

    event.listen(engine.pool, "checkout", checkout)
    try:
        yield counts
    finally:
        event.remove(engine.pool, "checkout", checkout)
        ends = 0
        for pgconn, trace in traced.values():
            pgconn.untrace()  # (flushes the trace)
            trace.seek(0)
            for line in trace:
                fields = line.split("\t")
                if fields[0] == "B" and fields[2] == "ReadyForQuery":
                    counts["round_trips"] += 1
                elif fields[0] == "F" and fields[2] == "Query":
                    command = fields[3].strip().strip('"').split(" ")[0].upper()
                    counts["transactions"] += command == "BEGIN"
                    ends += command in ("COMMIT", "ROLLBACK")
            trace.close()
        counts["statements"] = counts["round_trips"] - counts["transactions"] - ends - counts["checks"]


def per_event_work(events: int, *, library: list[int], receiver: Any) -> dict[str, Any]:
    """Runs ``events`` warm events through the event task in this process, eagerly (every
    task the path enqueues runs here too, the broker left out), one after another: the
    Postgres round trips per event, the task's CPU per event (this thread), and that CPU
    split by phase from a profile of a second run."""
    from workers.app import celery_app
    from workers.tasks import video_selected

    celery_app.conf.task_always_eager = True
    tag = uuid.uuid4().hex[:8]

    def serve(i: int, label: str) -> None:
        event = {
            "event_id": f"work-{label}-{tag}-{i}",
            "video_id": library[i % len(library)],
            "callback_url": receiver.url,
        }
        video_selected.apply(kwargs={"event": event}, task_id=str(uuid.uuid4()))

    try:
        for i in range(20):  # warm-up: connections, the index, caches
            serve(i, "warm")
        with counted_round_trips() as counts:  # (the trace costs CPU: not in the CPU figure)
            for i in range(events):
                serve(i, "count")
        started = time.thread_time()
        for i in range(events):
            serve(i, "cpu")
        cpu_ms = (time.thread_time() - started) / events * 1000
        profile = cProfile.Profile(time.thread_time)
        profile.enable()
        for i in range(events):
            serve(i, "profile")
        profile.disable()
    finally:
        celery_app.conf.task_always_eager = False
    receiver.wait_for({f"work-count-{tag}-{i}" for i in range(events)}, timeout_s=30)
    stats = pstats.Stats(profile)
    by_phase: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if filename != "~" or not callers:
            by_phase[_phase_of(filename)] = by_phase.get(_phase_of(filename), 0.0) + tottime
            continue
        # A built-in (a numpy ufunc, a socket call, json's encoder) is the phase of the
        # code that called it, split by the time spent under each caller.
        under = sum(caller[2] for caller in callers.values()) or 1.0
        for (caller_file, _, _), caller in callers.items():
            phase = _phase_of(caller_file)
            by_phase[phase] = by_phase.get(phase, 0.0) + tottime * caller[2] / under
    total = sum(by_phase.values()) or 1.0
    # The profiler slows what it profiles; its shares split the unprofiled CPU.
    return {
        "events": events,
        "round_trips_per_event": {k: round(v / events, 2) for k, v in counts.items()},
        "task_cpu_ms_per_event": round(cpu_ms, 2),
        "task_cpu_ms_by_phase": {k: round(cpu_ms * v / total, 2) for k, v in sorted(by_phase.items())},
    }


# --------------------------------------------------------------------------- the library


# Each library video's frame descriptors: a 60-s video at the default sampling (one a
# second), in the active encoder's frame width, so each event's search runs both stages.
LIBRARY_FRAMES = 60


def seed_library(n: int, *, seed: int = 0) -> list[int]:
    """``n`` ready library videos with clustered random vectors and frame descriptors for
    the active model, and an index built over them. Reused between runs (rows seeded
    before they had frame descriptors get them)."""
    import numpy as np
    from sqlalchemy import select

    from app.config import get_settings
    from app.db import session_scope
    from app.index import frames
    from app.index.rebuild import rebuild_index
    from app.learn.encoder import EncoderConfig
    from app.learn.registry import active_model
    from app.models import Embedding, Video

    rng = np.random.default_rng(seed)

    def frames_of(vector: np.ndarray, dim: int) -> tuple[bytes, bytes]:
        # Frames that wander around a per-video direction, as a video's seconds do.
        direction = np.resize(vector, dim) + 0.3 * rng.standard_normal(dim)
        walk = direction + 0.5 * rng.standard_normal((LIBRARY_FRAMES, dim)).cumsum(axis=0) / np.sqrt(LIBRARY_FRAMES)
        walk /= np.linalg.norm(walk, axis=1, keepdims=True)
        return frames.pack(walk, np.arange(LIBRARY_FRAMES, dtype=np.float32) + 0.5)

    with session_scope() as session:
        model = active_model(session=session)
        frame_dim = EncoderConfig.from_dict(model.config or {}).descriptor_dim  # as the encoder stores them
        have = list(session.scalars(select(Video.id).where(Video.uri.like("load://%"), Video.in_library)))[:n]
        without = list(
            session.scalars(
                select(Embedding).where(
                    Embedding.model_version_id == model.id,
                    Embedding.video_id.in_(have),
                    Embedding.frame_vectors.is_(None),
                )
            )
        )
        for embedding in without:
            vector = np.frombuffer(embedding.vector, dtype=np.float32)
            embedding.frame_dim = frame_dim
            embedding.frame_vectors, embedding.frame_times = frames_of(vector, frame_dim)
        if len(have) >= n and not without:
            return have
        centres = rng.standard_normal((max(1, n // 20), model.dim)).astype(np.float32)
        videos = [
            Video(uri=f"load://{uuid.uuid4().hex}", status="ready", in_library=True) for _ in range(n - len(have))
        ]
        session.add_all(videos)
        session.flush()
        for video in videos:
            vec = centres[rng.integers(len(centres))] + 0.5 * rng.standard_normal(model.dim).astype(np.float32)
            vec /= np.linalg.norm(vec)
            frame_vectors, frame_times = frames_of(vec, frame_dim)
            session.add(
                Embedding(
                    video_id=video.id,
                    model_version_id=model.id,
                    vector=vec.tobytes(),
                    dim=model.dim,
                    frames=LIBRARY_FRAMES,
                    frame_dim=frame_dim,
                    frame_vectors=frame_vectors,
                    frame_times=frame_times,
                )
            )
        session.flush()
        rebuild_index(session=session, model=model, settings=get_settings())
        return have + [v.id for v in videos]


# --------------------------------------------------------------------------- report


def print_report(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    table = Table(
        "rate /s",
        "published",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "answered",
        "errored",
        "lost",
        "drain s",
        "backlog at start",
        "worker CPU ms/event",
        title="warm event -> verified callback, open loop",
    )
    for p in [*results["phases"], *([results["floor"]] if results.get("floor") else [])]:
        name = f"{p['rate']:g}" + (" (floor: trivial task)" if p is results.get("floor") else "")
        table.add_row(
            name,
            str(p["published"]),
            *(str(p[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")),
            str(p["answered"]),
            str(p["errored"]),
            str(p["lost"]),
            str(p["drain_s"]),
            str(p["backlog_at_start"]),
            str(p["cpu_ms_per_event"]),
        )
    console.print(table)
    work = results.get("per_event")
    if work:
        console.print(f"Postgres round trips per warm event: {work['round_trips_per_event']}")
        console.print(
            f"CPU in the tasks, per warm event: {work['task_cpu_ms_per_event']} ms, by phase "
            f"{work['task_cpu_ms_by_phase']}"
        )
    if results.get("cpu_breakdown_ms"):
        console.print(
            f"worker CPU per event at {results['breakdown_rate']:g}/s, by phase: {results['cpu_breakdown_ms']}"
        )
    console.print(f"p99 crosses 100 ms at: {results['p99_over_100ms_at']} events/s")


def cpu_breakdown(results: dict[str, Any], rate: float) -> dict[str, float] | None:
    """Worker CPU per event at ``rate`` split by phase: the task's phases as measured in
    this process, and what the worker processes spent besides (Celery, the broker, the
    pool, logging) as ``broker``."""
    phase = next((p for p in results["phases"] if p["rate"] == rate and p["cpu_ms_per_event"]), None)
    work = results.get("per_event")
    if phase is None or not work:
        return None
    split = dict(work["task_cpu_ms_by_phase"])
    rest = phase["cpu_ms_per_event"] - work["task_cpu_ms_per_event"]
    split["broker"] = round(split.get("broker", 0.0) + max(0.0, rest), 2)
    return split


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = sorted(results["phases"], key=lambda p: p["rate"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rates = [p["rate"] for p in phases]
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
        left.plot(rates, [p[key] or float("nan") for p in phases], style, label=key.removesuffix("_ms"))
    floor = results.get("floor")
    if floor and floor["p50_ms"]:
        left.axhline(floor["p50_ms"], color="grey", lw=1, label=f"floor p50 (trivial task, {floor['rate']:g}/s)")
    for p in phases:
        if p["lost"] or p["errored"]:
            left.annotate(f"lost {p['lost']}, err {p['errored']}", (p["rate"], p["p99_ms"] or 1), fontsize=7)
    left.set(xlabel="events/s (open loop)", ylabel="event -> callback (ms)", yscale="log", title="warm latency vs rate")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    breakdown = results.get("cpu_breakdown_ms") or {}
    bottom = 0.0
    for name, ms in sorted(breakdown.items()):
        right.bar(["worker CPU per event"], [ms], bottom=bottom, label=f"{name} {ms:.2f} ms")
        bottom += ms
    if floor and floor["cpu_ms_per_event"]:
        right.bar(
            ["floor (trivial task)"],
            [floor["cpu_ms_per_event"]],
            color="grey",
            label=f"floor {floor['cpu_ms_per_event']:.2f} ms",
        )
    right.set(ylabel="CPU ms per event", title=f"CPU per event at {results.get('breakdown_rate', '?')}/s")
    if breakdown or (floor and floor["cpu_ms_per_event"]):
        right.legend(fontsize=8)
    else:  # --work-events 0 and --no-floor: nothing measured to break down
        right.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=right.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m scripts.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="10,25,50,100,150", help="events/s, one run each")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each rate's run")
    parser.add_argument("--rate", type=float, default=100.0, help="the headline rate (runs --headline-duration)")
    parser.add_argument("--headline-duration", type=float, default=60.0)
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for callbacks after a run")
    parser.add_argument("--idle-timeout", type=float, default=300.0, help="seconds to wait for a backlog between runs")
    parser.add_argument("--library", type=int, default=20, help="warm library videos")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes (the compose default)")
    parser.add_argument("--pool", default="prefork", help="the events worker's pool")
    parser.add_argument("--work-events", type=int, default=200, help="events of the in-process per-event figures")
    parser.add_argument("--no-worker", action="store_true", help="use workers that are already running")
    parser.add_argument("--no-floor", action="store_true", help="skip the Celery round-trip floor")
    parser.add_argument("--out", type=Path, default=None, help="folder of results.json and latency.png")
    args = parser.parse_args(argv)
    _defaults()

    from redis import Redis

    from app.config import get_settings
    from app.db import migrate
    from scripts.receiver import CallbackReceiver
    from workers.process import running_worker

    get_settings.cache_clear()
    settings = get_settings()
    migrate()
    work = settings.data_dir.resolve() / "load"
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    library = seed_library(args.library)
    redis = Redis.from_url(settings.redis_url or "")
    queue_key = settings.broker_prefix + "events"
    where = settings.sqlalchemy_url.split("@")[-1]
    print(
        f"library: {len(library)} warm videos; broker prefix {settings.broker_prefix!r}; {where}; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before the run"
    )

    print(_fresh_start(redis, settings.broker_prefix, settings.sqlalchemy_url))
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "phases": []}
    with CallbackReceiver(settings.webhook_secrets[0]) as rx:
        results["per_event"] = (
            per_event_work(args.work_events, library=library, receiver=rx) if args.work_events else None
        )
        worker = (
            contextlib.nullcontext(None)
            if args.no_worker
            else running_worker(
                work / "worker.log", queues=DEFAULT_QUEUES, pool=args.pool, concurrency=args.concurrency, beat=True
            )
        )
        with worker as proc:
            # The workers are this process's children; this process (publisher, receiver)
            # is not the service and is not counted.
            cpu = ProcessTreeCPU(_children()) if proc is not None else None
            warm_up = run_phase(
                10, 3, library=library, receiver=rx, redis=redis, queue_key=queue_key, drain_timeout_s=60, cpu=None
            )
            print(f"warm-up: {warm_up.answered}/{warm_up.published} answered, p50 {warm_up.p50_ms} ms")
            for rate in rates:
                duration = args.headline_duration if rate == args.rate else args.duration
                phase = run_phase(
                    rate,
                    duration,
                    library=library,
                    receiver=rx,
                    redis=redis,
                    queue_key=queue_key,
                    drain_timeout_s=args.drain_timeout,
                    cpu=cpu,
                )
                results["phases"].append(asdict(phase))
                print(
                    f"{rate:g}/s x {duration:g} s: p50 {phase.p50_ms} p95 {phase.p95_ms} p99 {phase.p99_ms} ms, "
                    f"lost {phase.lost}, errored {phase.errored}, CPU {phase.cpu_ms_per_event} ms/event"
                )
                _wait_idle(rx, redis, queue_key, args.idle_timeout)
        if rx.rejected:
            print(f"receiver rejected {len(rx.rejected)} callbacks: {rx.rejected[:3]}")
        results["rejected_callbacks"] = len(rx.rejected)
    if not args.no_floor:
        floor_rate = args.rate
        results["floor"] = asdict(
            measure_floor(
                floor_rate,
                min(args.duration, 20.0),
                work=work,
                redis=redis,
                prefix=settings.broker_prefix,
                concurrency=args.concurrency,
            )
        )
    crossed = [p["rate"] for p in results["phases"] if p["lost"] or (p["p99_ms"] or 0) > 100]
    results["p99_over_100ms_at"] = min(crossed, default=None)
    results["breakdown_rate"] = args.rate if args.rate in rates else (rates[0] if rates else None)
    results["cpu_breakdown_ms"] = cpu_breakdown(results, results["breakdown_rate"]) if rates else None
    print_report(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "latency.png")
    print(f"results: {out / 'results.json'}, plot: {out / 'latency.png'}")
    return results


def _fresh_start(redis: Any, prefix: str, database_url: str) -> str:
    """Drops what earlier runs left in the load test's own queues and database (never
    anyone else's): their queued events and retries, whose receivers are gone, and their
    pending deliveries, which the sweeper would keep retrying through this run."""
    if not database_url.endswith(f"/{LOAD_DB}") or prefix != f"{LOAD_DB}:":
        return "not the load test's own database and queues: nothing dropped"
    from sqlalchemy import update

    from app.db import session_scope
    from app.models import Delivery

    queued = sum(int(redis.llen(prefix + q)) for q in ("events", "callbacks"))
    redis.delete(prefix + "events", prefix + "callbacks")
    with session_scope() as session:
        stale = session.execute(
            update(Delivery)
            .where(Delivery.status == "pending")
            .values(status="dead", next_attempt_at=None, last_error="left by an earlier load test run")
        ).rowcount  # type: ignore[attr-defined]
    return f"dropped what earlier runs left: {queued} queued messages, {stale} pending deliveries"


def _children() -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process().children()]


def _wait_idle(receiver: Any, redis: Any, queue_key: str, seconds: float) -> None:
    """Lets the events a run left queued (past its drain timeout) be served, and their
    callbacks arrive, before the next run starts; what is still queued then is that
    run's ``backlog_at_start``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and redis.llen(queue_key):
        time.sleep(1.0)
    count = -1
    while time.monotonic() < deadline and count != len(receiver.received):
        count = len(receiver.received)
        time.sleep(1.0)


if __name__ == "__main__":
    main()
