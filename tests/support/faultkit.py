"""Tools for the fault and hostile-input suites (tests/test_faults.py, tests/test_hostile.py).

- :class:`OwnRedis` and :class:`OwnPostgres`: throwaway servers on free ports that a test
  may kill and restart. The machine's shared Postgres (5432) and Redis (6379) are never
  restarted: other test runs use them at the same time.
- :class:`Stack`: one deployment of the test's own (a database, a broker key prefix, a data
  dir), with real ``celery worker`` / ``celery beat`` processes, the ``vidsim`` CLI and a
  publisher run as subprocesses (``app.config`` is read once per process, so anything that
  talks to another stack runs in a process of its own), and SQLAlchemy checks made from
  the test process on an engine of its own.
- :class:`Hook`: the chat app's callback endpoint on a fixed local port that can go down
  and come back, answer as a test says (500, 429 + Retry-After, 410...), verify every
  signature and remember every request.

Run as a script, this file is that publisher (one JSON object per line on stdin: either
keyword arguments of ``workers.publish.publish_video_selected``, or ``{"raw": <anything>}``
sent as the task's ``event`` argument as-is); it prints one JSON line per event::

    python tests/faultkit.py publish --rate 20 < events.jsonl
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CELERY = (PYTHON, "-m", "celery", "-A", "workers.app:celery_app")  # workers.process.celery_command, less --quiet


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres_user(cmd: list[str]) -> list[str]:
    # initdb and the server refuse to run as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    on_path = shutil.which(name)
    if on_path is None:
        raise RuntimeError(f"{name} not found (PostgreSQL server binaries)")
    return on_path


# --------------------------------------------------------------------------- servers


class OwnRedis:
    """``redis-server`` on a free port, append-only (a restart keeps the queues, as in
    docker-compose.yml), never evicting. ``stop()`` is a clean shutdown (the AOF is
    flushed), ``kill()`` a crash."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--maxmemory-policy",
            "noeviction",
            "--dir",
            str(self.folder),
            "--logfile",
            str(self.folder / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis did not start: {(self.folder / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def ping(self) -> bool:
        import redis

        try:
            client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis writes the AOF and exits
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> OwnRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class OwnPostgres:
    """A throwaway PostgreSQL cluster (initdb) on a free port, its socket in its folder.

    The folder is made under the system temp dir (the server runs as the ``postgres``
    user, who cannot enter pytest's root-only temp dirs) and removed at exit."""

    def __init__(self) -> None:
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="vidsim-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.port = free_port()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *cmd: str) -> None:
        proc = subprocess.run(_as_postgres_user(list(cmd)), capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{cmd[0]} failed: {proc.stderr[-2000:]}{proc.stdout[-500:]}\n{tail}")

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run(
            _pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "60", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean restart (sessions are cut); ``immediate``: a crash."""
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> OwnPostgres:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


# --------------------------------------------------------------------------- a stack


@dataclass
class Stack:
    """One deployment of the test's own: a database, a broker prefix, a data folder,
    and the settings every process of it gets (``env``)."""

    database_url: str
    redis_url: str
    data_dir: Path
    settings: dict[str, str] = field(default_factory=dict)
    prefix: str = field(default_factory=lambda: f"fault-{uuid.uuid4().hex[:8]}:")
    _engine: Any = None

    @property
    def media_dir(self) -> Path:
        return self.data_dir / "media"

    def env(self, **extra: str) -> dict[str, str]:
        """The full environment of a process of this stack (the test's own as a base)."""
        self.media_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "VIDSIM_BROKER_PREFIX": self.prefix,
            "VIDSIM_DATA_DIR": str(self.data_dir),
            "VIDSIM_MEDIA_ROOTS": str(self.media_dir),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            **self.settings,
            **extra,
        }
        return env

    # -- the schema, seed data and checks (test process, own engine)

    def migrate(self) -> None:
        subprocess.run(
            [PYTHON, "-c", "from app.db import migrate; migrate()"],
            env=self.env(),
            check=True,
            cwd=ROOT,
            timeout=120,
            capture_output=True,
        )

    @property
    def engine(self):  # type: ignore[no-untyped-def]
        if self._engine is None:
            from sqlalchemy import create_engine

            url = self.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
            self._engine = create_engine(url, pool_pre_ping=True, pool_size=2)
        return self._engine

    @contextlib.contextmanager
    def session(self) -> Iterator[Any]:
        from sqlalchemy.orm import Session

        with Session(self.engine, expire_on_commit=False) as s:
            yield s
            s.commit()

    def seed_library(self, n: int, *, seed: int = 0) -> list[int]:
        """``n`` ready library videos with embeddings for the active model (random unit
        vectors: enough for warm events, which search what is stored; no decoding)."""
        import numpy as np

        from app.learn.registry import active_model
        from app.models import Embedding, Video

        rng = np.random.default_rng(seed)
        with self.session() as s:
            model = active_model(session=s)
            videos = [Video(uri=f"test://seed/{uuid.uuid4().hex}", status="ready", in_library=True) for _ in range(n)]
            s.add_all(videos)
            s.flush()
            for video in videos:
                vec = rng.standard_normal(model.dim).astype(np.float32)
                vec /= np.linalg.norm(vec)
                s.add(
                    Embedding(
                        video_id=video.id, model_version_id=model.id, vector=vec.tobytes(), dim=model.dim, frames=1
                    )
                )
            return [v.id for v in videos]

    def outcomes(self, event_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Per event: its status and error, how many recommendation rows it has, and its
        delivery's status, attempts and webhook id."""
        from sqlalchemy import func, select

        from app.models import Delivery, Event, Recommendation

        out: dict[str, dict[str, Any]] = {
            e: {"status": None, "recommendations": 0, "delivery": None} for e in event_ids
        }
        with self.session() as s:
            for ev in s.scalars(select(Event).where(Event.event_id.in_(event_ids))):
                out[ev.event_id].update(status=ev.status, error=ev.error)
            counts = s.execute(
                select(Recommendation.event_id, func.count())
                .where(Recommendation.event_id.in_(event_ids))
                .group_by(Recommendation.event_id)
            )
            for event_id, n in counts:
                out[event_id]["recommendations"] = n
            rows = s.execute(
                select(Recommendation.event_id, Delivery).join(Delivery).where(Recommendation.event_id.in_(event_ids))
            )
            for event_id, d in rows:
                out[event_id]["delivery"] = {
                    "id": d.id,
                    "status": d.status,
                    "attempts": d.attempts,
                    "webhook_id": d.webhook_id,
                    "last_error": d.last_error,
                }
        return out

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def drop_keys(self) -> None:
        """Deletes this stack's broker keys (its own prefix) from Redis."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        for key in client.scan_iter(match=f"{self.prefix}*"):
            client.delete(key)
        client.close()

    # -- processes

    @contextlib.contextmanager
    def worker(
        self,
        name: str = "worker",
        *,
        pool: str = "prefork",
        queues: str = "events,fetch,embed,callbacks,maintenance",
        **extra: str,
    ) -> Iterator[Supervised]:
        """A real ``celery worker`` of this stack (beat runs apart: :meth:`beat`), kept
        running as docker-compose.yml's ``restart: unless-stopped`` does. Yields once the
        first one consumes."""
        args = [
            *CELERY,
            "worker",
            "--pool",
            pool,
            "-Q",
            queues,
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            "-n",
            f"{name}-{uuid.uuid4().hex[:6]}@%h",
        ]
        with Supervised(args, self.data_dir / f"{name}.log", self.env(**extra), ready=b"ready.") as proc:
            yield proc

    @contextlib.contextmanager
    def beat(self, **extra: str) -> Iterator[Supervised]:
        """``celery beat`` (the outbox sweeper), supervised like :meth:`worker`."""
        args = [
            *CELERY,
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(self.data_dir / "beat-schedule"),
        ]
        with Supervised(args, self.data_dir / "beat.log", self.env(**extra)) as proc:
            yield proc

    def publisher(self, events: list[dict[str, Any]], *, rate: float = 0.0, **extra: str) -> subprocess.Popen:
        """Starts publishing ``events`` (at ``rate`` per second; 0: as fast as possible)
        from a subprocess; read its results with :func:`publisher_results`."""
        run = self.data_dir / f"publish-{uuid.uuid4().hex[:8]}"
        run.mkdir(parents=True)
        (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        with (
            open(run / "events.jsonl") as stdin,
            open(run / "results.jsonl", "w") as out,
            open(run / "stderr", "w") as err,
        ):
            proc = subprocess.Popen(
                [PYTHON, str(Path(__file__)), "publish", "--rate", str(rate)],
                stdin=stdin,
                stdout=out,
                stderr=err,
                env=self.env(**extra),
                cwd=ROOT,
            )
        proc.run_dir = run  # type: ignore[attr-defined]
        return proc

    def publish(
        self, events: list[dict[str, Any]], *, rate: float = 0.0, timeout_s: float = 300, **extra: str
    ) -> list[dict]:
        return publisher_results(self.publisher(events, rate=rate, **extra), timeout_s=timeout_s)

    def cli(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """The ``vidsim`` command of this stack."""
        return subprocess.run(
            [PYTHON, "-m", "scripts.cli", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=self.env(COLUMNS="250", **extra),
            cwd=ROOT,
        )

    def queue_depths(self) -> dict[str, int]:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            return {q: int(client.llen(self.prefix + q)) for q in ("events", "embed", "callbacks", "maintenance")}
        finally:
            client.close()

    def log(self, name: str = "worker") -> str:
        path = self.data_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def shared_stack(data_dir: Path, **settings: str) -> Iterator[Stack]:
    """A Stack with a database of its own in the shared Postgres and a broker prefix of
    its own in the shared Redis, migrated; both are dropped on exit."""
    from conftest import _pg_url, create_database, drop_database

    name = create_database()
    stack = Stack(database_url=_pg_url(name), redis_url=os.environ["REDIS_URL"], data_dir=data_dir, settings=settings)
    try:
        stack.migrate()
        yield stack
    finally:
        stack.dispose()
        drop_database(name)
        stack.drop_keys()


def publisher_results(proc: subprocess.Popen, *, timeout_s: float = 300) -> list[dict]:
    proc.wait(timeout=timeout_s)
    run: Path = proc.run_dir  # type: ignore[attr-defined]
    if proc.returncode != 0:
        raise RuntimeError(f"publisher failed ({proc.returncode}): {(run / 'stderr').read_text()[-3000:]}")
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.startswith("{")]


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (for a prefork worker: its pool processes)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return sorted(set(found))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Supervised:
    """A process kept running as a supervisor does: started again (after a second) when
    it exits, until the context ends. ``pid`` is the current one's, ``starts`` how many
    were started, ``exits`` their exit statuses."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str], *, ready: bytes | None = None) -> None:
        self.args, self.log_path, self.env, self.ready = args, log_path, env, ready
        self.procs: list[subprocess.Popen] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, daemon=True)

    @property
    def pid(self) -> int:
        return self.procs[-1].pid

    @property
    def starts(self) -> int:
        return len(self.procs)

    @property
    def exits(self) -> list[int | None]:
        return [p.returncode for p in self.procs[:-1]]

    def _supervise(self) -> None:
        with open(self.log_path, "ab") as log:
            while not self._stopping.is_set():
                proc = subprocess.Popen(
                    self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True
                )
                self.procs.append(proc)
                while proc.poll() is None and not self._stopping.wait(0.2):
                    pass
                if not self._stopping.is_set():
                    log.write(f"\n--- supervisor: exited with {proc.returncode}, starting again ---\n".encode())
                    log.flush()
                    self._stopping.wait(1.0)

    def __enter__(self) -> Supervised:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._thread.start()
        deadline = time.monotonic() + 90
        while self.ready is not None:
            data = self.log_path.read_bytes()[offset:] if self.log_path.exists() else b""
            if self.ready in data:
                break
            if time.monotonic() > deadline or (self.procs and self.procs[0].poll() is not None):
                self.__exit__()
                raise RuntimeError(f"{self.args[4:6]} did not start:\n{data[-3000:].decode(errors='replace')}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        for proc in self.procs:
            if proc.poll() is None:
                stop_process_group(proc)


# --------------------------------------------------------------------------- receiver


@dataclass
class Request:
    webhook_id: str
    event_id: str | None
    status: int  # what the hook answered
    at: float  # time.time()
    payload: dict[str, Any] | None
    verified: bool


class Hook:
    """The chat app's callback endpoint on a fixed 127.0.0.1 port. ``answer(payload, n)``
    (``n``: how many requests this event's webhook id had before) returns a status and
    headers; the default is 200. ``down()`` closes the port (connections are refused),
    ``up()`` opens it again. Every request is verified and recorded in ``requests``."""

    def __init__(self, secret: str, answer: Callable[[dict[str, Any], int], tuple[int, dict[str, str]]] | None = None):
        self.secret = secret
        self.answer = answer
        self.port = free_port()
        self.requests: list[Request] = []
        self._lock = threading.Condition()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/vidsim"

    def up(self) -> None:
        from app.deliver.signing import verify

        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                msg_id = self.headers.get("webhook-id", "")
                try:
                    payload: dict[str, Any] | None = verify(secret=hook.secret, headers=dict(self.headers), body=body)
                except Exception:
                    payload = None
                if payload is None:
                    status, headers = 401, {}
                else:
                    with hook._lock:
                        seen = sum(1 for r in hook.requests if r.webhook_id == msg_id)
                    status, headers = hook.answer(payload, seen) if hook.answer else (200, {})
                with hook._lock:
                    event_id = payload.get("event_id") if payload else None
                    hook.requests.append(Request(msg_id, event_id, status, time.time(), payload, payload is not None))
                    hook._lock.notify_all()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Hook:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def delivered(self) -> dict[str, list[Request]]:
        """Successful (2xx, verified) requests per event id."""
        out: dict[str, list[Request]] = {}
        with self._lock:
            for r in self.requests:
                if r.verified and 200 <= r.status < 300 and r.event_id:
                    out.setdefault(r.event_id, []).append(r)
        return out

    def wait_delivered(self, event_ids: set[str], timeout_s: float) -> dict[str, list[Request]]:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                got = self.delivered()
                if event_ids <= got.keys() or time.monotonic() >= deadline:
                    return got
                self._lock.wait(timeout=0.5)

    def for_event(self, event_id: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.event_id == event_id]


# --------------------------------------------------------------------------- publisher


def _publish_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="faultkit publish")
    parser.add_argument("--rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from workers.app import celery_app
    from workers.publish import EVENT_TASK, publish_video_selected

    started = time.monotonic()
    for i, line in enumerate(sys.stdin):
        item = json.loads(line)
        if args.rate > 0:
            time.sleep(max(0.0, started + i / args.rate - time.monotonic()))
        sent = time.time()
        try:
            if "raw" in item:
                celery_app.send_task(EVENT_TASK, kwargs={"event": item["raw"]}, queue="events")
                event_id = item.get("event_id")
            else:
                event_id = publish_video_selected(**item)
            ok, error = True, None
        except Exception as exc:  # the caller (a chat app) sees the publish fail
            ok, error, event_id = False, f"{type(exc).__name__}: {exc}"[:300], item.get("event_id")
        print(
            json.dumps({"i": i, "event_id": event_id, "sent": sent, "done": time.time(), "ok": ok, "error": error}),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["publish"]:
        sys.exit(_publish_main(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)
