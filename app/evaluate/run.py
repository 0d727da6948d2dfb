"""Running a benchmark: decode every clip once per frame size (sandboxed,
:mod:`app.media.video`), score every system on the same data, and report; and fine-tuning
an encoder on the benchmark's library, as a customer would, to score the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from app.evaluate.ground_truth import GroundTruth
from app.evaluate.metrics import evaluate, recall_at_1_by_edit
from app.evaluate.report import Report, summary_table, write_reports
from app.evaluate.systems import BASELINES, Clip, build_systems
from app.media import video as video_io

logger = logging.getLogger(__name__)


def _decode_all(paths: list[Path], *, size: int, fps: float, max_frames: int, progress: Progress) -> list[Clip]:
    clips: list[Clip] = []
    task = progress.add_task(f"decoding at {size}x{size}", total=len(paths))
    for path in paths:
        try:
            clips.append(video_io.sample_frames(path, fps=fps, size=size, max_frames=max_frames).frames)
        except video_io.VideoError as exc:
            raise RuntimeError(f"benchmark clip {path} does not decode: {exc.reason}") from exc
        progress.advance(task)
    return clips


def run(
    ground_truth_path: Path,
    *,
    out_dir: Path,
    checkpoints: dict[str, Path] | None = None,
    baselines: Sequence[str] = BASELINES,
    fps: float = 1.0,
    max_frames: int = 64,
    batch_size: int = 8,
    console: Console | None = None,
    show_progress: bool = True,
) -> Report:
    """Runs every system (trained ``checkpoints`` by name, then ``baselines``) on one
    benchmark; prints a table and writes ``report.json``, ``report.md`` and ``report.png``
    into ``out_dir``. Clips are decoded once per frame size, ``fps`` frames a second."""
    console = console or Console()
    gt = GroundTruth.load(Path(ground_truth_path))
    systems = build_systems(dict(checkpoints or {}), baselines, batch_size)
    q_paths = [q.path for q in gt.queries]
    l_paths = [c.path for c in gt.library]
    positives = gt.positives
    metrics: dict[str, dict[str, float]] = {}
    per_edit: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    decoded: dict[int, tuple[list[Clip], list[Clip]]] = {}
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=not show_progress,
    )  # fmt: skip
    with progress:
        for system in systems:
            size = system.frame_size
            if size not in decoded:
                t0 = time.perf_counter()
                decoded[size] = (
                    _decode_all(q_paths, size=size, fps=fps, max_frames=max_frames, progress=progress),
                    _decode_all(l_paths, size=size, fps=fps, max_frames=max_frames, progress=progress),
                )
                seconds[f"decode@{size}"] = time.perf_counter() - t0
            queries, library = decoded[size]
            t0 = time.perf_counter()
            scores = np.asarray(system.score_matrix(queries, library), dtype=np.float64)
            seconds[system.name] = time.perf_counter() - t0
            if scores.shape != (len(queries), len(library)):
                raise ValueError(f"{system.name}: scores {scores.shape}, expected {(len(queries), len(library))}")
            metrics[system.name] = evaluate(scores, positives)
            per_edit[system.name] = recall_at_1_by_edit(scores, gt)
            logger.info("%s: %s in %.1f s", system.name, metrics[system.name], seconds[system.name])
    counts = {
        "library": len(gt.library),
        "sources": len({c.source for c in gt.library}),
        "queries": len(gt.queries),
        "negatives": sum(p is None for p in positives),
    }
    edit_counts: dict[str, int] = {}
    for q in gt.queries:
        for name in q.edits if q.positive is not None else ():
            edit_counts[name] = edit_counts.get(name, 0) + 1
    baseline_names = [s.name for s in systems if s.baseline]
    report = Report(metrics, per_edit, seconds, baseline_names, counts, dict(sorted(edit_counts.items())))
    write_reports(report, Path(out_dir), gt_path=Path(ground_truth_path), fps=fps)
    console.print(summary_table(report))
    return report


def finetune_on_library(
    ground_truth_path: Path,
    out_dir: Path,
    *,
    steps: int,
    preset: str = "cpu-small",
    init_checkpoint: Path | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
) -> Any:
    """The product's ``vidsim finetune``, inside the benchmark: self-supervised training on
    the benchmark's **library clips only** (the company's library; never a query, whose
    edits the encoder must not see), from ``init_checkpoint`` or, without one, from the
    preset's initial weights (those of the ``untrained`` baseline). Resumes a run already
    in ``out_dir``. Returns the :class:`app.learn.train.loop.TrainResult`; its ``checkpoint`` is the
    system to score."""
    from app.learn.train.config import TrainConfig
    from app.learn.train.loop import train

    gt = GroundTruth.load(Path(ground_truth_path))
    videos = [c.path for c in gt.library]
    queries = {q.path.resolve() for q in gt.queries}
    assert not queries & {v.resolve() for v in videos}, "a query file is in the library"
    config = TrainConfig.preset(preset, **{**(overrides or {}), "steps": steps, "epochs": None})
    return train(config, videos, out_dir=Path(out_dir), resume=True, init_checkpoint=init_checkpoint, progress=progress)
