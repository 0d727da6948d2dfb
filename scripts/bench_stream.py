"""Decode and embed one 60-s 640x360 video, serially or streamed, in this process: what
overlapping the forward passes with the decoding child gains, with and without leaving
the child a core (one torch thread fewer), and with other chunk sizes; and what a spare
decoding child, started ahead, saves against one started for the request. The variants are
alternated video by video, so the machine's load falls on all alike.

    python -m scripts.bench_stream --videos 3 --repeats 2

Needs no database: the encoder is the untrained one a fresh install serves (the same
network and cost as a trained one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from app.evaluate.footage import real_footage
from app.learn.device import cpu_has_bf16, torch_threads
from app.learn.encoder import INITIAL_CONFIG, VideoEncoder, initial_encoder
from app.media import sandbox
from app.media.video import sample_frames, stream_frames
from scripts.bench_latency import make_cold_videos


def _variants(encoder: VideoEncoder, all_threads: int) -> dict[str, Callable[[Path], object]]:
    bf16 = cpu_has_bf16()
    fewer = max(1, all_threads - 1)

    def decode_only(path: Path, decoder: int = 0) -> object:
        with stream_frames(path, decode_threads=decoder) as stream:
            for _ in stream:
                pass
            return stream.sample()

    def serial(path: Path) -> object:  # the path before streaming: decode all, then embed
        frames = sample_frames(path).frames
        with torch_threads(all_threads):
            return encoder.describe([frames], bf16=bf16)

    def streamed(threads: int, chunk: int, decoder: int = 0) -> Callable[[Path], object]:
        def run(path: Path) -> object:
            stream = stream_frames(path, chunk_frames=chunk, decode_threads=decoder)
            with stream, torch_threads(threads):
                return encoder.describe_stream(stream, bf16=bf16)

        return run

    def decode_with_spare(ready: bool) -> Callable[[Path], object]:
        """Decode only, the request sent to a spare child that has imported what it needs
        (``ready``), or to a child started for it (no spare)."""

        def run(path: Path) -> float:
            spare = sandbox._take_spare()
            if spare is not None:
                spare.discard()
            if ready:
                sandbox._start_spare()
                time.sleep(1.0)  # its start-up, done before the request comes
            sandbox.SPARE_CHILD = ready
            try:
                t = time.perf_counter()
                decode_only(path)
                return time.perf_counter() - t
            finally:
                sandbox.SPARE_CHILD = True

        return run

    frames_of: dict[Path, object] = {}

    def embed_only(threads: int) -> Callable[[Path], object]:
        def run(path: Path) -> object:
            frames = frames_of.setdefault(path, sample_frames(path).frames)
            t = time.perf_counter()
            with torch_threads(threads):
                encoder.describe([frames], bf16=bf16)  # type: ignore[list-item]
            return time.perf_counter() - t  # the decode above is not counted

        return run

    return {
        "decode only (streaming child, frames discarded)": decode_only,
        "decode only, 1 decoder thread": lambda path: decode_only(path, 1),
        "decode only, a spare child ready (app.media.sandbox)": decode_with_spare(True),
        "decode only, a child started for the request (no spare)": decode_with_spare(False),
        f"embed only, {all_threads} torch threads": embed_only(all_threads),
        f"embed only, {fewer} torch thread(s)": embed_only(fewer),
        f"serial: decode, then embed ({all_threads} threads)": serial,
        f"streamed, chunks of 8, {fewer} thread(s) (leave the child a core)": streamed(fewer, 8),
        f"streamed, chunks of 8, {all_threads} threads": streamed(all_threads, 8),
        f"streamed, chunks of 16, {fewer} thread(s)": streamed(fewer, 16),
        f"streamed, chunks of 8, {fewer} thread(s), 1 decoder thread": streamed(fewer, 8, 1),
        f"streamed, chunks of 8, {all_threads} threads, 1 decoder thread": streamed(all_threads, 8, 1),
    }


def main(*, videos: int = 3, repeats: int = 2) -> dict[str, list[float]]:
    encoder = initial_encoder(INITIAL_CONFIG)
    all_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="vidsim-bench-stream-") as tmp:
        sources = [f.path for f in real_footage(Path(tmp) / "sources")]
        paths = make_cold_videos(Path(tmp) / "videos", videos, sources)
        variants = _variants(encoder, all_threads)
        times: dict[str, list[float]] = {name: [] for name in variants}
        load_before = _load()
        for path in paths:
            variants[f"embed only, {all_threads} torch threads"](path)  # warm-up: decodes once, loads
            for _ in range(repeats):
                for name, run in variants.items():
                    t = time.perf_counter()
                    out = run(path)
                    times[name].append(out if isinstance(out, float) else time.perf_counter() - t)
    decode = statistics.median(times["decode only (streaming child, frames discarded)"])
    print(f"{len(paths)} videos x {repeats}, torch threads {all_threads}, bf16 {cpu_has_bf16()}")
    print(f"{'variant':70s} {'median s':>9s} {'/ decode':>9s}  all")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:70s} {med:9.2f} {med / decode:9.2f}  {' '.join(f'{v:.2f}' for v in values)}")
    print(f"load average (1, 5, 15 min) at the start: {load_before}, at the end: {_load()}")
    return times


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    main(videos=args.videos, repeats=args.repeats)
