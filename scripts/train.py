"""Train (or fine-tune) the video encoder with Barlow Twins.

    python -m scripts.train --preset cpu-small --videos /data/library --out runs/small
    python -m scripts.train --preset cpu-small --videos 'clips/*.mp4' --out runs/small --resume
    python -m scripts.train --preset cpu-small --videos lib/ --out runs/ft --init runs/small/model-step000060.pt \
        --epochs 5
    torchrun --nproc_per_node=8 -m scripts.train --preset full --videos /data/crawl --out runs/full

Every rank runs this script; rank 0 alone prints and writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
import os
import sys
from pathlib import Path

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".3gp", ".ogv"}


def expand_videos(specs: list[str]) -> list[Path]:
    """Files, folders (searched recursively for video suffixes) and globs, sorted, unique."""
    found: set[Path] = set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        elif path.is_file():
            found.add(path)
        else:
            matches = [Path(p) for p in glob.glob(spec, recursive=True)]
            if not matches:
                raise SystemExit(f"no videos match {spec!r}")
            found.update(p for p in matches if p.is_file())
    return sorted(found)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from app.learn.train.config import PRESETS

    parser = argparse.ArgumentParser(prog="python -m scripts.train", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--videos", nargs="+", required=True, help="files, folders or globs")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, metrics, loss.png)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--init", type=Path, help="start from this checkpoint's weights (fine-tuning)")
    parser.add_argument("--lambd", type=float, help="off-diagonal weight (spec 0.001, paper 0.0051)")
    parser.add_argument("--steps", type=int, help="step budget (replaces the preset's steps/epochs)")
    parser.add_argument("--epochs", type=int, help="passes over the videos (replaces the preset's steps/epochs)")
    parser.add_argument("--batch-size", type=int, help="global batch size")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--frames", type=int, help="frames per window")
    parser.add_argument("--workers", type=int, help="loader workers per rank")
    parser.add_argument("--serve", choices=["representation", "projection"], help="which vector serves retrieval")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    from app.learn.train.config import TrainConfig
    from app.learn.train.loop import finetune, train

    overrides: dict = {}
    for name, attr in (
        ("lambd", "lambd"),
        ("batch_size", "batch_size"),
        ("lr", "lr"),
        ("frames", "frames"),
        ("workers", "num_workers"),
        ("seed", "seed"),
    ):
        if getattr(args, name) is not None:
            overrides[attr] = getattr(args, name)
    if args.steps is not None:
        overrides.update(steps=args.steps, epochs=None)
    elif args.epochs is not None:
        overrides.update(steps=None, epochs=args.epochs)
    config = TrainConfig.preset(args.preset, **overrides)
    if args.serve:
        config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, serve=args.serve))
    videos = expand_videos(args.videos)
    if not videos:
        raise SystemExit("no videos found")
    progress = not args.no_progress and rank == 0
    if args.init is not None and args.steps is None:
        result = finetune(
            config,
            videos,
            init_checkpoint=args.init,
            out_dir=args.out,
            epochs=args.epochs or 5,
            resume=args.resume,
            progress=progress,
        )
    else:
        result = train(
            config, videos, out_dir=args.out, resume=args.resume, init_checkpoint=args.init, progress=progress
        )
    if rank == 0:
        loss = result.final_metrics.get("loss", float("nan"))
        print(
            f"trained {result.steps} steps ({result.epochs:.1f} epochs, {result.clips} clips) on {result.videos} "
            f"videos in {result.seconds:.0f} s: {result.clips_per_s:.2f} clips/s, final loss {loss:.1f}"
        )
        if result.skipped:
            print(f"skipped {len(result.skipped)} videos (reasons in the log)")
        print(f"checkpoint: {result.checkpoint}")
        if result.loss_plot:
            print(f"loss curve: {result.loss_plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
