"""What a training run refuses before it starts: videos a benchmark must never see in
training, and a resumed run on another list of videos than the one it began with.

- **Benchmark footage.** A benchmark (``ground_truth.json``, :mod:`app.evaluate.ground_truth`)
  records every source, library clip and query by content (sha256 and size). Training on
  a query (whose edits the benchmark measures invariance to) or on any footage of the
  test part (which must stay unseen for its scores to mean anything) is refused, whatever
  the file is called or wherever it lies. The benchmarks guarded are the ones
  ``VIDSIM_BENCHMARKS`` names (a benchmark's own fine-tune guards its own as well).
- **The video list of a resumed run.** A run's position is an index into its list of
  videos, so a resumed run on another list would silently train on other videos than
  its checkpoint says. The list a run starts with is kept in ``out_dir/videos.json``; a
  resume with a different one (videos added, removed or reordered) is refused.

The benchmark's file format belongs to :mod:`app.evaluate.ground_truth`, a leaf module
(it imports nothing of the evaluation), which is why training may read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from app.files import write_atomic
from app.learn.train.checkpoints import LAST_CHECKPOINT

logger = logging.getLogger(__name__)

VIDEO_LIST = "videos.json"  # in a run's out_dir: the videos it was started on, in order


class TrainingVideosRefused(ValueError):
    """A list of training videos that must not be trained on; the message says why."""


def check_training_videos(
    videos: Sequence[Path | str], *, out_dir: Path, resume: bool, benchmarks: Sequence[Path] | None = None
) -> None:
    """Both guards, before a run in ``out_dir`` starts: refuses benchmark footage
    (``benchmarks``, default ``VIDSIM_BENCHMARKS``), then a resumed run whose list of
    videos differs from the one it started with; records the list of a new run."""
    if benchmarks is None:
        from app.config import get_settings

        benchmarks = get_settings().benchmarks
    refuse_benchmark_footage(videos, benchmarks)
    keep_video_list(videos, out_dir=Path(out_dir), resume=resume)


def _ground_truths(benchmarks: Sequence[Path]) -> list[Path]:
    from app.evaluate.ground_truth import GROUND_TRUTH

    found: list[Path] = []
    for entry in map(Path, benchmarks):
        if entry.is_file():
            found.append(entry)
            continue
        inside = sorted(entry.rglob(GROUND_TRUTH)) if entry.is_dir() else []
        if not inside:
            # A guard that silently guards nothing is worse than none: say so.
            raise TrainingVideosRefused(f"benchmark {entry} holds no {GROUND_TRUTH}: fix VIDSIM_BENCHMARKS")
        found.extend(inside)
    return found


class BenchmarkFootage:
    """What ``benchmarks`` (ground-truth files, or folders searched for them) forbid in
    training: each query, and every source and library clip of a test part, by content.
    :meth:`what` hashes only files of a size some forbidden file has, so checking a long
    list of files costs a ``stat`` each."""

    def __init__(self, benchmarks: Sequence[Path]) -> None:
        from app.evaluate.ground_truth import GroundTruth

        self.forbidden: dict[str, str] = {}  # sha256 -> what it is
        self.sizes: set[int] = set()
        for path in _ground_truths(benchmarks):
            try:
                gt = GroundTruth.load(path)
            except (OSError, KeyError, ValueError) as exc:
                raise TrainingVideosRefused(f"benchmark {path} cannot be read ({exc}): fix or remove it") from None
            self.forbidden |= {
                digest: f"{what} of benchmark {path}" for digest, what in gt.forbidden_in_training().items()
            }
            self.sizes |= gt.forbidden_sizes()

    def what(self, video: Path | str) -> str | None:
        """What ``video`` is to a benchmark if training must not see it, else None (also
        for a file that cannot be read: training skips it with its reason)."""
        from app.media.register import file_sha256

        try:
            size = Path(video).stat().st_size
        except OSError:
            return None
        if size not in self.sizes:
            return None
        return self.forbidden.get(file_sha256(Path(video)))


def refuse_benchmark_footage(videos: Sequence[Path | str], benchmarks: Sequence[Path]) -> None:
    """Raises :class:`TrainingVideosRefused` if any of ``videos`` has the content of a
    query of one of ``benchmarks`` (ground-truth files, or folders searched for them), or
    of a source or library clip of its test part (see :class:`BenchmarkFootage`)."""
    footage = BenchmarkFootage(benchmarks)
    if not footage.forbidden:
        return
    refused = [f"{video} is {what}" for video in videos if (what := footage.what(video))]
    if refused:
        more = f" (and {len(refused) - 5} more)" if len(refused) > 5 else ""
        raise TrainingVideosRefused(
            f"refusing to train on {len(refused)} benchmark video(s): " + "; ".join(refused[:5]) + more
            + ". A benchmark's queries and its test part's footage must never be trained on: "
            "leave them out of the training videos"
        )  # fmt: skip


def _listed(videos: Sequence[Path | str]) -> list[str]:
    return [str(Path(v).resolve()) for v in videos]


def keep_video_list(videos: Sequence[Path | str], *, out_dir: Path, resume: bool) -> None:
    """Refuses to resume the run in ``out_dir`` on another list of videos than the one it
    started with (kept in ``out_dir/videos.json``); a run starting afresh records its
    list there. A run from before lists were kept records it on its first resume."""
    record = out_dir / VIDEO_LIST
    listed = _listed(videos)
    if (out_dir / LAST_CHECKPOINT).exists():
        if not resume:
            return  # not resumed: the run is refused as it stands (checkpoints.starting_point)
        if record.is_file():
            _refuse_changed(json.loads(record.read_text())["videos"], listed, out_dir)
            return
        logger.warning("%s: no %s (a run from before lists were kept); recording this one", out_dir, VIDEO_LIST)
    digest = hashlib.sha256("\n".join(listed).encode()).hexdigest()
    write_atomic(record, json.dumps({"count": len(listed), "sha256": digest, "videos": listed}, indent=0))


def _refuse_changed(started: list[str], now: list[str], out_dir: Path) -> None:
    if started == now:
        return
    before, after = set(started), set(now)
    added, removed = [v for v in now if v not in before], [v for v in started if v not in after]
    if not added and not removed:
        change = "the same videos in another order"
    else:
        parts = []
        if added:
            parts.append(f"{len(added)} added (e.g. {added[0]})")
        if removed:
            parts.append(f"{len(removed)} removed (e.g. {removed[0]})")
        change = ", ".join(parts)
    raise TrainingVideosRefused(
        f"cannot resume the run in {out_dir}: it was started on {len(started)} videos ({out_dir / VIDEO_LIST}), "
        f"this one gives {len(now)}: {change}. Its position in the epoch would point at other videos: "
        "resume with the same videos in the same order, or start a new run in another folder"
    )
