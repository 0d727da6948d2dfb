"""Backfill throughput: library videos embedded per second, beside decode-only videos per
second of the same videos, measured in the same run (alternated video by video, so the
machine's load falls on both alike), and the fraction backfill / decode only (the
issue's target: >= 0.8).

    python -m scripts.bench_backfill --videos 6

Each video is a distinct 60-s 640x360 H.264 video looped from real footage (the cold
benchmark's), registered in the library. Decode only is the sandboxed child streaming
the frames a backfill samples, discarded; the backfill is ``embed_video`` (what `vidsim
backfill --inline` and each `embed_video` task run): decode, the forward passes on the
chunks as they come, storing the embedding. One video at a time, in this process. Uses
DATABASE_URL / REDIS_URL, or the local services in a database of the bench's own.
"""

from __future__ import annotations

import argparse
import os
import time

from rich.console import Console
from rich.table import Table

from scripts.bench_latency import BENCH_DB, make_cold_videos
from scripts.local_services import use_local_services


def main(*, videos: int = 6, console: Console | None = None) -> dict[str, float]:
    console = console or Console()
    use_local_services(BENCH_DB)
    from app.config import get_settings
    from app.db import migrate, session_scope
    from app.evaluate.footage import real_footage
    from app.learn.registry import active_model, encoder_for
    from app.media import video as video_io
    from app.media.register import register
    from app.serve.recommend import embed_video

    settings = get_settings()
    migrate()
    work = settings.data_dir.resolve() / "bench"
    sources = [f.path for f in real_footage(work / "sources")]
    paths = make_cold_videos(work / "backfill", videos, sources)
    with session_scope() as session:
        ids = [register(session, str(p), settings=settings).video_id for p in paths]
        model = active_model(session=session)
        encoder_for(model)  # loaded once, as a worker process does
        size = int(model.config.get("frame_size", 224))
    limits = video_io.decode_limits(settings)

    load_before = _load()
    decode_s = backfill_s = 0.0
    failed = 0
    for path, video_id in zip(paths, ids, strict=True):
        t0 = time.perf_counter()
        stream = video_io.stream_frames(
            path, fps=settings.frame_fps, size=size, max_frames=settings.max_frames, limits=limits
        )
        with stream:
            for _ in stream:
                pass  # decode only: the frames are discarded
            stream.sample()
        t1 = time.perf_counter()
        result = embed_video(video_id, sessions=session_scope, settings=settings)
        t2 = time.perf_counter()
        failed += not result.ok
        decode_s += t1 - t0
        backfill_s += t2 - t1
    figures = {
        "videos": videos,
        "failed": failed,
        "decode_only_videos_per_s": videos / decode_s,
        "backfill_videos_per_s": videos / backfill_s,
        "fraction": decode_s / backfill_s,
    }
    table = Table("measure", "videos/s", "s per video", title="vidsim backfill throughput (60-s 640x360 videos)")
    for name, seconds in (
        ("decode only (sandboxed child, frames discarded)", decode_s),
        ("backfill (embed_video: decode + embed + store)", backfill_s),
    ):
        table.add_row(name, f"{videos / seconds:.3f}", f"{seconds / videos:.2f}")
    console.print(table)
    console.print(
        f"backfill / decode-only throughput: {figures['fraction']:.2f} (the issue's target: >= 0.8); "
        f"{failed} failed; load average (1, 5, 15 min) at the start: {load_before}, at the end: {_load()}"
    )
    return figures


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=6, help="distinct 60-s videos to decode and backfill")
    main(videos=parser.parse_args().videos)
