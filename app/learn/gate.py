"""The rollout gate: a trained model serves only where it finds copies of the company's
own videos at least as well as the model it would replace.

Self-supervised training on a small library can make answers worse, and nothing in the
training loss says so (on the retrieval benchmark no short CPU run was ahead of the
untrained encoder by more than its interval, and some were behind). Before a model is rolled out
(`vidsim train/finetune --activate`, `vidsim model activate`, a queued run's end, the
demo), both models are scored on synthetic copies of up to :data:`GATE_VIDEOS` library
videos: a stretch of each, edited with two of the copy-detection edits
(:data:`app.evaluate.edits.EDITS`, in turn), searched against the library on the served
path (index, calibration, frame re-rank) as the benchmark scores systems
(:mod:`app.evaluate.systems`). The candidate passes when neither its recall@1 nor its µAP
is lower; its 95 % bootstrap intervals are reported beside them. Everything is
deterministic: the same library and models give the same verdict.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from app.config import Settings
from app.evaluate.corpus import QueryClip
from app.evaluate.edits import EDITS
from app.evaluate.metrics import score
from app.evaluate.served import SecondStage
from app.evaluate.systems import encoder_system
from app.index.params import index_params
from app.learn import registry
from app.media import video as video_io
from app.media.ffmpeg import cut, duration_of
from app.models import ModelVersion

logger = logging.getLogger(__name__)

# Library videos the gate copies (evenly spread over the library by id), and edits a video.
GATE_VIDEOS = 32
EDITS_PER_VIDEO = 2
# Bootstrap resamples of the reported intervals (the verdict compares the point values).
RESAMPLES = 200
# Each copy is this stretch of its video: from a fifth in, three fifths long (>= 1 s).
COPY_START, COPY_LENGTH = 0.2, 0.6


@dataclass(frozen=True)
class Verdict:
    """The candidate's and the incumbent's scores on the same copies; ``passes`` when the
    candidate is no worse on recall@1 and µAP (or when there is too little to compare)."""

    candidate: str
    incumbent: str
    copies: int
    library: int
    scores: dict[str, dict[str, float]]  # model name -> recall@1, uAP
    intervals: dict[str, dict[str, tuple[float, float]]]
    passes: bool

    def summary(self) -> str:
        if not self.scores:
            return f"too few library videos to compare {self.candidate} with {self.incumbent} ({self.library})"

        def line(name: str) -> str:
            s, ci = self.scores[name], self.intervals[name]
            return (f"{name}: recall@1 {s['recall@1']:.3f} [{ci['recall@1'][0]:.2f}-{ci['recall@1'][1]:.2f}], "
                    f"µAP {s['uAP']:.3f} [{ci['uAP'][0]:.2f}-{ci['uAP'][1]:.2f}]")  # fmt: skip

        head = f"{self.copies} edited copies of {self.library} library videos"
        return f"{head}: {line(self.candidate)}; {line(self.incumbent)}"

    def refusal(self) -> str | None:
        """Why the candidate may not serve; None when it passes."""
        if self.passes:
            return None
        return f"{self.candidate} finds the library's copies less well than {self.incumbent}, which keeps serving"


def make_copies(videos: list[Path], out_dir: Path) -> list[QueryClip]:
    """Two edited stretches of each video (:data:`COPY_START`, :data:`COPY_LENGTH`), the
    edits of :data:`EDITS` taken in turn; a video ffmpeg cannot cut is skipped."""
    edits = list(EDITS.values())
    copies: list[QueryClip] = []
    for i, path in enumerate(videos):
        try:
            total = duration_of(path)
        except (OSError, RuntimeError, ValueError) as exc:
            logger.warning("gate: skipped %s: %s", path, exc)
            continue
        length = min(total, max(1.0, COPY_LENGTH * total))
        start = min(COPY_START * total, total - length)
        for j in range(EDITS_PER_VIDEO):
            edit = edits[(EDITS_PER_VIDEO * i + j) % len(edits)]
            dst = out_dir / f"{i}-{edit.name}.mp4"
            try:
                cut(path, dst, start_s=start, duration_s=length, vf=edit.vf, crf=edit.crf, fps=edit.fps)
            except (OSError, RuntimeError) as exc:
                logger.warning("gate: no %s copy of %s: %s", edit.name, path, exc)
                continue
            copies.append(QueryClip(dst, path, edit.name))
    return copies


def _spread(items: list[Path], n: int) -> list[Path]:
    """Up to ``n`` of ``items``, evenly spread (all of them when there are no more)."""
    if len(items) <= n:
        return items
    return [items[int(k)] for k in np.linspace(0, len(items) - 1, n).round()]


def compare(
    candidate: ModelVersion,
    incumbent: ModelVersion,
    videos: list[Path],
    *,
    settings: Settings,
    progress: Callable[[str], None] | None = None,
) -> Verdict:
    """Scores ``candidate`` and ``incumbent`` on synthetic copies of (up to
    :data:`GATE_VIDEOS` of) the library ``videos``; see the module docstring."""
    videos = _spread(videos, GATE_VIDEOS)
    names = (candidate.name, incumbent.name)
    with tempfile.TemporaryDirectory(prefix="vidsim-gate-") as tmp:
        if progress:
            progress(f"making edited copies of {len(videos)} library videos")
        copies = make_copies(videos, Path(tmp)) if len(videos) >= 2 else []
        if len({c.source for c in copies}) < 2:
            return Verdict(*names, copies=len(copies), library=len(videos), scores={}, intervals={}, passes=True)
        column = {path: j for j, path in enumerate(videos)}
        positives: list[int | None] = [column[c.source] for c in copies]
        scores: dict[str, dict[str, float]] = {}
        intervals: dict[str, dict[str, tuple[float, float]]] = {}
        decoded: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for model in (candidate, incumbent):
            # A copy of the encoder: the benchmark's pipeline fits the library
            # normalisation on the library in place, which must not reach serving's.
            encoder = registry.load_encoder(model)
            size = int(encoder.config.frame_size)
            if size not in decoded:
                if progress:
                    progress(f"decoding {len(videos) + len(copies)} videos at {size} px")
                decoded[size] = ([_frames(c.path, size, settings) for c in copies],
                                 [_frames(v, size, settings) for v in videos])  # fmt: skip
            if progress:
                progress(f"scoring model {model.id} {model.name}")
            system = encoder_system(model.name, encoder, baseline=False, params=index_params(settings),
                                    stage=SecondStage())  # fmt: skip
            result = score(system.score_matrix(*decoded[size]), positives, resamples=RESAMPLES)
            scores[model.name] = {k: round(result.metrics[k], 4) for k in ("recall@1", "uAP")}
            intervals[model.name] = {k: result.intervals[k] for k in ("recall@1", "uAP")}
    c, i = scores[candidate.name], scores[incumbent.name]
    passes = c["recall@1"] >= i["recall@1"] and c["uAP"] >= i["uAP"]
    return Verdict(*names, copies=len(copies), library=len(videos), scores=scores, intervals=intervals, passes=passes)


def _frames(path: Path, size: int, settings: Settings) -> np.ndarray:
    return video_io.sample_frames(path, fps=settings.frame_fps, size=size, max_frames=settings.max_frames).frames


def check(*, session: Session, model_id: int, settings: Settings,
          progress: Callable[[str], None] | None = None) -> Verdict | None:  # fmt: skip
    """The gate for rolling model ``model_id`` out in place of the active model (None when
    it is the active one, or when ``VIDSIM_ROLLOUT_GATE`` is off), on the library's files;
    logs the verdict."""
    from app.learn.rollout import library_files

    candidate = session.get_one(ModelVersion, model_id)
    incumbent = registry.active_model(session=session)
    if incumbent.id == candidate.id or not settings.rollout_gate:
        return None
    verdict = compare(candidate, incumbent, library_files(session=session), settings=settings, progress=progress)
    logger.info("rollout gate for model %d against model %d: %s (%s)", candidate.id, incumbent.id,
                "passes" if verdict.passes else "fails", json.dumps(verdict.scores))  # fmt: skip
    return verdict
