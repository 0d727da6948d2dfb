"""Event -> callback latency through the real path (Redis, Postgres, a Celery worker, a
local HTTP receiver), cold (a 60-s video never seen) beside the decode-only and
embed-only time of the same frames measured in the same run, and optionally warm events
published one after another (``events``). Events lost or answered with an error are
counted beside the percentiles. `vidsim bench latency` runs the open-loop warm
benchmark (:mod:`scripts.load`) first, then this.

    vidsim bench latency --cold 5 --events 100

Uses DATABASE_URL / REDIS_URL (the Makefile's `bench` target points them at the local
services, in a database of its own).
"""

from __future__ import annotations

import random
import statistics
import time

from rich.console import Console
from rich.progress import track
from rich.table import Table

from scripts.local_services import use_local_services

BENCH_DB = "vidsim_bench"


def _defaults() -> None:
    """Point at the local services in a database of the bench's own, unless configured."""
    use_local_services(BENCH_DB)


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values) or [float("nan")]

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    mean = statistics.fmean(values) if values else float("nan")
    return {"n": len(values), "p50": pct(50), "p95": pct(95), "p99": pct(99), "mean": mean}


def main(*, events: int = 0, cold: int = 5, console: Console | None = None) -> dict[str, dict[str, float]]:
    console = console or Console()
    _defaults()
    from sqlalchemy import func, select

    from app.config import get_settings
    from app.db import migrate, session_scope
    from app.evaluate.footage import real_footage
    from app.index.rebuild import rebuild_index
    from app.learn.registry import active_model, embed_clips
    from app.media import video as video_io
    from app.media.ffmpeg import cut, run_ffmpeg
    from app.media.register import register
    from app.media.video import decode_limits
    from app.models import Embedding
    from scripts.receiver import CallbackReceiver
    from workers.process import running_worker
    from workers.publish import publish_video_selected
    from workers.tasks import embed_video

    settings = get_settings()
    migrate()
    work = settings.data_dir.resolve() / "bench"
    sources = real_footage(work / "sources")
    library = []
    for i, footage in enumerate(sources):
        for j in range(2):
            dst = work / "library" / f"{footage.name}-{j}.mp4"
            if not dst.exists():
                cut(footage.path, dst, start_s=j * 1.5, duration_s=4.0)
            library.append(dst)
        if i >= 9:
            break
    with session_scope() as session:
        ids = [register(session, str(p), settings=settings).video_id for p in library]

    cold_videos = []
    (work / "cold").mkdir(parents=True, exist_ok=True)
    for i in range(cold):  # distinct 60-s 640x360 videos, looped from real footage
        dst = work / "cold" / f"cold-{time.time_ns()}-{i}.mp4"
        src = sources[i % len(sources)].path
        hue = 37 * i + random.randint(0, 36)
        run_ffmpeg([
            "-stream_loop", "-1", "-t", "60", "-i", str(src), "-vf", f"scale=640:360,hue=h={hue}",
            "-an", "-c:v", "libx264", "-preset", "veryfast", "-crf", "26", "-pix_fmt", "yuv420p", str(dst),
        ])  # fmt: skip
        cold_videos.append(dst)

    results: dict[str, dict[str, float]] = {}
    with running_worker(work / "worker.log", pool="prefork", beat=False):
        with session_scope() as session:
            model = active_model(session=session)
        for video_id in ids:
            embed_video.delay(video_id)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with session_scope() as session:
                done = session.scalar(
                    select(func.count()).where(Embedding.video_id.in_(ids), Embedding.model_version_id == model.id)
                )
            if done == len(ids):
                break
            time.sleep(0.5)
        with session_scope() as session:
            rebuild_index(session=session, model=model, settings=settings)

        with CallbackReceiver(settings.webhook_secrets[0]) as rx:
            # Warm-up: the worker process loads the index and its connections once.
            for _ in range(5):
                eid = publish_video_selected(video_id=ids[0], callback_url=rx.url)
                rx.wait_for({eid}, timeout_s=60)
            warm, dropped = [], {"lost": 0, "errored": 0}  # counted beside the percentiles, never dropped
            for _ in track(range(events), description="warm events", console=console):
                sent = time.time()
                eid = publish_video_selected(video_id=random.choice(ids), callback_url=rx.url)
                got = rx.wait_for({eid}, timeout_s=60).get(eid)
                if got is None:
                    dropped["lost"] += 1
                elif got.payload.get("error"):
                    dropped["errored"] += 1
                else:
                    warm.append((got.at - sent) * 1000)
            if events:
                results["warm event -> callback (ms)"] = _percentiles(warm) | dropped

            cold_ms, cold_dropped = [], {"lost": 0, "errored": 0}
            for path in track(cold_videos, description="cold events", console=console):
                sent = time.time()
                eid = publish_video_selected(video_uri=str(path), callback_url=rx.url)
                got = rx.wait_for({eid}, timeout_s=600).get(eid)
                if got is None:
                    cold_dropped["lost"] += 1
                elif got.payload.get("error"):
                    cold_dropped["errored"] += 1
                else:
                    cold_ms.append((got.at - sent) * 1000)
            if cold_videos:
                results["cold 60-s video event -> callback (ms)"] = _percentiles(cold_ms) | cold_dropped

    decode_ms, embed_ms = [], []
    limits = decode_limits(settings)
    size = int(model.config.get("frame_size", 224))
    for path in cold_videos:
        t0 = time.perf_counter()
        sample = video_io.sample_frames(
            path, fps=settings.frame_fps, size=size, max_frames=settings.max_frames, limits=limits
        )
        t1 = time.perf_counter()
        embed_clips(model, [sample.frames])
        t2 = time.perf_counter()
        decode_ms.append((t1 - t0) * 1000)
        embed_ms.append((t2 - t1) * 1000)
    if decode_ms:
        results["decode only, same 60-s videos (ms)"] = _percentiles(decode_ms)
        results["embed only, same frames (ms)"] = _percentiles(embed_ms)

    columns = ("measure", "n", "p50", "p95", "p99", "mean", "lost", "errored")
    table = Table(*columns, title="vidsim event -> callback latency")
    for name, r in results.items():
        figures = (f"{r[k]:.1f}" for k in ("p50", "p95", "p99", "mean"))
        table.add_row(name, str(r["n"]), *figures, str(r.get("lost", "")), str(r.get("errored", "")))
    console.print(table)
    cold_key = "cold 60-s video event -> callback (ms)"
    if cold_key in results and decode_ms:
        ratio = results[cold_key]["p50"] / results["decode only, same 60-s videos (ms)"]["p50"]
        console.print(f"cold p50 is {ratio:.2f}x the decode-only p50 (decode + embed + queue + search + callback)")
    return results


if __name__ == "__main__":
    main()
