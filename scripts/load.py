"""Load test: publish warm video-selected events at a fixed rate through the real path
(Redis, a Celery worker, Postgres, a local signed-callback receiver) and measure
event -> callback latency, the rate achieved, and the queue depth over time; then step
the rate up to find where latency breaks.

    python -m scripts.load                        # 60 s at 10/s, then 20 s steps at 5..160/s
    python -m scripts.load --rate 20 --duration 120 --steps 20,40,60,80 --step-duration 30
    python -m scripts.load --no-worker            # against workers you already run

Warm events name library videos that are already embedded, so an event costs a lookup,
an index search, two Postgres transactions and a signed HTTP POST. The library is
``--library`` videos with random unit vectors for the active model and a built index
(search cost depends on the index, not on where the vectors came from).

A rate "breaks" when the p95 latency exceeds ``--p95-target-ms``, or fewer callbacks
than events arrive per second, or the events queue still holds more than one second of
events when publishing stops. Results (summary and time series) are written to
``--out`` as JSON.

Uses DATABASE_URL / REDIS_URL when set; otherwise a database ``vidsim_load`` on the local
Postgres and Redis database 12, with a broker key prefix of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scripts.local_services import use_local_services
from workers.process import running_worker

LOAD_DB = "vidsim_load"


def _defaults() -> None:
    """Point at the local services, in a database and key prefix of the load test's own."""
    use_local_services(LOAD_DB, VIDSIM_OUTBOX_SWEEP_INTERVAL_S="1", VIDSIM_TORCH_THREADS="1")


@dataclass
class Phase:
    """One fixed-rate run and what it measured."""

    rate: float  # events per second asked for
    duration_s: float
    published: int = 0
    publish_rate: float = 0.0  # achieved
    called_back: int = 0
    callback_rate: float = 0.0  # callbacks per second while events were published (and draining)
    drain_s: float | None = None  # from the last publish to the last callback
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    events_queue_max: int = 0
    events_queue_at_stop: int = 0
    depth: list[tuple[float, int, int]] = field(default_factory=list)  # (t, events, callbacks) every 0.5 s
    broke: list[str] = field(default_factory=list)


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _seed_library(n: int, *, seed: int = 0) -> list[int]:
    """``n`` ready library videos with clustered random vectors for the active model, and
    an index built over them. Reused between runs."""
    import numpy as np
    from sqlalchemy import select

    from app.config import get_settings
    from app.db import session_scope
    from app.index.rebuild import rebuild_index
    from app.learn.registry import active_model
    from app.models import Embedding, Video

    with session_scope() as session:
        model = active_model(session=session)
        have = list(session.scalars(select(Video.id).where(Video.uri.like("load://%"), Video.in_library)))
        if len(have) >= n:
            return have[:n]
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((max(1, n // 20), model.dim)).astype(np.float32)
        videos = [
            Video(uri=f"load://{uuid.uuid4().hex}", status="ready", in_library=True) for _ in range(n - len(have))
        ]
        session.add_all(videos)
        session.flush()
        for video in videos:
            vec = centres[rng.integers(len(centres))] + 0.5 * rng.standard_normal(model.dim).astype(np.float32)
            vec /= np.linalg.norm(vec)
            session.add(
                Embedding(video_id=video.id, model_version_id=model.id, vector=vec.tobytes(), dim=model.dim, frames=1)
            )
        session.flush()
        rebuild_index(session=session, model=model, settings=get_settings())
        return have + [v.id for v in videos]


def _depths() -> tuple[int, int]:
    """Messages waiting in the events and callbacks queues."""
    from workers.metrics import queue_depths  # after use_local_services set the broker

    depths = queue_depths()
    return depths["events"], depths["callbacks"]


def run_phase(
    rate: float,
    duration_s: float,
    *,
    library: list[int],
    receiver,
    drain_timeout_s: float,
    p95_target_ms: float,
) -> Phase:
    """Publishes at ``rate`` for ``duration_s`` (open loop: on schedule whatever the
    answers), samples the queues, then waits for the callbacks."""
    from workers.publish import publish_video_selected

    phase = Phase(rate=rate, duration_s=duration_s)
    sent: dict[str, float] = {}
    stop_sampling = threading.Event()
    t0 = time.time()

    def sample() -> None:
        while not stop_sampling.is_set():
            events, callbacks = _depths()
            phase.depth.append((round(time.time() - t0, 2), events, callbacks))
            stop_sampling.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    n = int(rate * duration_s)
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        event_id = f"load-{uuid.uuid4().hex}"
        sent[event_id] = time.time()
        publish_video_selected(event_id=event_id, video_id=random.choice(library), callback_url=receiver.url)
    publish_s = time.monotonic() - start
    stopped_at = time.time()
    phase.events_queue_at_stop = _depths()[0]
    got = receiver.wait_for(set(sent), timeout_s=drain_timeout_s)
    stop_sampling.set()
    sampler.join()

    latencies = [(got[e].at - sent[e]) * 1000 for e in sent if e in got]
    phase.published, phase.publish_rate = n, round(n / publish_s, 1)
    phase.called_back = len(latencies)
    if latencies:
        last = max(got[e].at for e in sent if e in got)
        phase.drain_s = round(max(0.0, last - stopped_at), 2)
        phase.callback_rate = round(len(latencies) / max(publish_s, last - t0), 1)
        phase.p50_ms, phase.p95_ms, phase.p99_ms = (round(_pct(latencies, p), 1) for p in (50, 95, 99))
        phase.max_ms = round(max(latencies), 1)
    phase.events_queue_max = max((e for _, e, _ in phase.depth), default=0)
    if phase.called_back < n:
        phase.broke.append(f"{n - phase.called_back} callbacks missing after {drain_timeout_s:g} s")
    if phase.p95_ms is not None and phase.p95_ms > p95_target_ms:
        phase.broke.append(f"p95 {phase.p95_ms:.0f} ms > {p95_target_ms:g} ms")
    if phase.callback_rate < 0.95 * phase.publish_rate:
        phase.broke.append(f"callbacks {phase.callback_rate}/s < events {phase.publish_rate}/s")
    if phase.events_queue_at_stop > rate:
        phase.broke.append(f"{phase.events_queue_at_stop} events queued when publishing stopped")
    return phase


def _wait_idle(timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and sum(_depths()) > 0:
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m scripts.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=10.0, help="events/s of the main run")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the main run (at least 60)")
    parser.add_argument("--steps", default="5,10,20,40,60,80,120,160", help="rates of the step-up runs ('' for none)")
    parser.add_argument("--step-duration", type=float, default=20.0)
    parser.add_argument("--p95-target-ms", type=float, default=250.0)
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for callbacks after a run")
    parser.add_argument("--library", type=int, default=2000, help="warm library videos")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes (prefork)")
    parser.add_argument("--no-worker", action="store_true", help="use workers that are already running")
    parser.add_argument("--keep-going", action="store_true", help="run every step even after one broke")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: DATA_DIR/load/results.json)")
    args = parser.parse_args(argv)
    _defaults()

    from app.config import get_settings
    from app.db import migrate
    from scripts.receiver import CallbackReceiver

    get_settings.cache_clear()
    settings = get_settings()
    migrate()
    work = settings.data_dir.resolve() / "load"
    out = args.out or work / "results.json"
    library = _seed_library(args.library)
    where = settings.sqlalchemy_url.split("@")[-1]
    print(f"library: {len(library)} warm videos; broker prefix {settings.broker_prefix!r}; {where}")

    results: dict = {"settings": vars(args) | {"out": str(out)}, "phases": []}
    worker = (
        contextlib.nullcontext()
        if args.no_worker
        else running_worker(
            work / "worker.log",
            queues="events,embed,callbacks,maintenance",
            pool="prefork",
            concurrency=args.concurrency,
        )
    )
    with worker, CallbackReceiver(settings.webhook_secrets[0]) as rx:
        warm_up = run_phase(5, 4, library=library, receiver=rx, drain_timeout_s=60, p95_target_ms=args.p95_target_ms)
        print(f"warm-up: {warm_up.called_back}/{warm_up.published} called back, p50 {warm_up.p50_ms} ms")
        plan = [("main", args.rate, args.duration)]
        plan += [("step", float(r), args.step_duration) for r in args.steps.split(",") if r.strip()]
        for kind, rate, duration in plan:
            _wait_idle()
            phase = run_phase(
                rate,
                duration,
                library=library,
                receiver=rx,
                drain_timeout_s=args.drain_timeout,
                p95_target_ms=args.p95_target_ms,
            )
            results["phases"].append({"kind": kind, **asdict(phase)})
            print(_line(kind, phase))
            if kind == "step" and phase.broke and not args.keep_going:
                break
        if rx.rejected:
            print(f"receiver rejected {len(rx.rejected)} callbacks: {rx.rejected[:3]}")
    steps = [p for p in results["phases"] if p["kind"] == "step"]
    ok = [p["rate"] for p in steps if not p["broke"]]
    broke = [p["rate"] for p in steps if p["broke"]]
    results["sustained_rate"] = max(ok, default=None)
    results["breaking_rate"] = min(broke, default=None)
    print(f"sustained: {results['sustained_rate']} events/s; latency breaks at: {results['breaking_rate']} events/s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"results: {out}")
    return results


def _line(kind: str, p: Phase) -> str:
    depth = [e for _, e, _ in p.depth]
    trend = " ".join(str(d) for d in depth[:: max(1, len(depth) // 12)])
    return (
        f"{kind} {p.rate:g}/s x {p.duration_s:g} s: published {p.published} at {p.publish_rate}/s, "
        f"{p.called_back} callbacks at {p.callback_rate}/s; "
        f"p50 {p.p50_ms} p95 {p.p95_ms} p99 {p.p99_ms} max {p.max_ms} ms; "
        f"events queue max {p.events_queue_max}, at stop {p.events_queue_at_stop}, drain {p.drain_s} s; "
        f"depth over time [{trend}]" + (f"; BROKE: {', '.join(p.broke)}" if p.broke else "")
    )


if __name__ == "__main__":
    main()
