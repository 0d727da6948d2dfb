"""Running a benchmark: decode every clip once per frame size (sandboxed,
:mod:`app.media.video`), score every system on the same data, part by part (dev and
test, :mod:`.ground_truth`), and report; and fine-tuning an encoder on the development
part's library, as a customer would on theirs, to score the result.
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

from app.config import get_settings
from app.evaluate.edits import HELD_OUT_EDITS
from app.evaluate.ground_truth import DEV, GroundTruth
from app.evaluate.metrics import BOOTSTRAP_RESAMPLES, Scored, score, score_by_family
from app.evaluate.report import PartReport, Report, summary_tables, write_reports
from app.evaluate.served import SecondStage
from app.evaluate.systems import BASELINES, Clip, build_systems
from app.index.params import IndexParams, index_params
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
    index: IndexParams | None = None,
    stage: SecondStage | None = None,
    ablation: bool = False,
    resamples: int = BOOTSTRAP_RESAMPLES,
    console: Console | None = None,
    show_progress: bool = True,
) -> Report:
    """Runs every system (trained ``checkpoints`` by name, then ``baselines``) on each
    part of one benchmark, on the served path of ``index`` (default: the settings'
    ``IndexParams``) and ``stage`` (default: serving's second stage; with
    ``ablation``, each system's first stage alone and its unnormalised re-rank too);
    prints the tables and writes ``report.json``, ``report.md`` and the plots into
    ``out_dir``. Clips are decoded once per frame size, ``fps`` frames a second;
    intervals come from ``resamples`` bootstrap resamples of each part's queries."""
    console = console or Console()
    gt = GroundTruth.load(Path(ground_truth_path))
    params = index or index_params(get_settings())
    systems = build_systems(dict(checkpoints or {}), baselines, batch_size, params=params, stage=stage,
                            ablation=ablation)  # fmt: skip
    seconds: dict[str, float] = {}
    decoded: dict[int, tuple[list[Clip], list[Clip]]] = {}
    parts: dict[str, PartReport] = {}
    baseline_names: list[str] = []  # the baselines' labels, their ablation variants included
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
                    _decode_all([q.path for q in gt.queries], size=size, fps=fps, max_frames=max_frames,
                                progress=progress),
                    _decode_all([c.path for c in gt.library], size=size, fps=fps, max_frames=max_frames,
                                progress=progress),
                )  # fmt: skip
                seconds[f"decode@{size}"] = time.perf_counter() - t0
        for name in gt.parts:
            sub = gt.part(name)
            rows = [i for i, q in enumerate(gt.queries) if q.part == name]
            cols = [i for i, c in enumerate(gt.library) if c.part == name]
            scored: dict[str, Scored] = {}
            families: dict[str, dict[str, Scored]] = {}
            for system in systems:
                queries, library = decoded[system.frame_size]
                t0 = time.perf_counter()
                variants = system.score_matrices([queries[i] for i in rows], [library[j] for j in cols])
                seconds[system.name] = seconds.get(system.name, 0.0) + time.perf_counter() - t0
                for variant, matrix in variants.items():
                    scores, label = np.asarray(matrix, dtype=np.float64), system.name + variant
                    if scores.shape != (len(rows), len(cols)):
                        raise ValueError(f"{label}: scores {scores.shape}, expected {(len(rows), len(cols))}")
                    scored[label] = score(scores, sub, resamples=resamples)
                    if system.baseline and label not in baseline_names:
                        baseline_names.append(label)
                    families[label] = score_by_family(scores, sub, resamples=resamples)
                    logger.info("%s on the %s part: %s", label, name, scored[label].metrics)
            copied = {c.source for c in sub.library if not c.distractor}
            counts = {
                "library": len(sub.library),
                "sources": len(copied),
                "distractors": sum(c.distractor for c in sub.library),
                "queries": len(sub.queries),
                "negatives": sum(q.positive is None for q in sub.queries),
            }
            sources = sorted({s.name for s in sub.sources} or copied)
            parts[name] = PartReport(counts, sources, scored, families)
    report = Report(
        parts, seconds, baseline_names, list(HELD_OUT_EDITS),
        index=params.to_dict(), resamples=resamples,
    )  # fmt: skip
    write_reports(report, Path(out_dir), gt_path=Path(ground_truth_path), fps=fps)
    for table in summary_tables(report):
        console.print(table)
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
    the **development part's library clips only** (the company's library; never a query,
    whose edits the encoder must not see, nor any footage of the test part, which must
    stay unseen for its scores to mean anything: both refused by
    :func:`app.learn.train.guards.refuse_benchmark_footage`), from ``init_checkpoint`` or,
    without one, from the preset's initial weights (those of the ``untrained`` baseline).
    Resumes a run already in ``out_dir``. Returns the
    :class:`app.learn.train.loop.TrainResult`; its ``checkpoint`` is the system to score."""
    from app.learn.train.config import TrainConfig
    from app.learn.train.guards import refuse_benchmark_footage
    from app.learn.train.loop import train

    gt = GroundTruth.load(Path(ground_truth_path))
    videos = [c.path for c in gt.part(DEV).library]
    if not videos:
        raise ValueError(f"{ground_truth_path} has no development part to fine-tune on (a single source?)")
    refuse_benchmark_footage(videos, [Path(ground_truth_path)])
    config = TrainConfig.preset(preset, **{**(overrides or {}), "steps": steps, "epochs": None})
    return train(config, videos, out_dir=Path(out_dir), resume=True, init_checkpoint=init_checkpoint, progress=progress)
