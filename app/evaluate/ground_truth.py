"""The benchmark's answer file, ``ground_truth.json``: the library clips, the queries, and
for each query the library clip it copies (None for a negative).

Paths are stored relative to the JSON file, so a benchmark directory can be moved.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.files import write_atomic

GROUND_TRUTH = "ground_truth.json"  # the file name inside a benchmark directory
FORMAT_VERSION = 1  # of ground_truth.json; also part of a benchmark's spec


@dataclass(frozen=True)
class LibraryClip:
    id: str
    path: Path
    source: str
    start_s: float  # where the clip starts in its source
    duration_s: float


@dataclass(frozen=True)
class Query:
    id: str
    path: Path
    edit: str  # edit names joined by "+", e.g. "hflip+insertion"
    positive: str | None  # the library clip it copies, None for a negative
    source: str
    start_s: float  # the copied stretch: in the library clip (positive) or source (negative)
    duration_s: float

    @property
    def edits(self) -> tuple[str, ...]:
        return tuple(self.edit.split("+"))


@dataclass(frozen=True)
class GroundTruth:
    library: list[LibraryClip]
    queries: list[Query]
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def positives(self) -> list[int | None]:
        """For each query, the library column of its copy, or None."""
        column = {clip.id: i for i, clip in enumerate(self.library)}
        return [None if q.positive is None else column[q.positive] for q in self.queries]

    @classmethod
    def load(cls, path: Path) -> GroundTruth:
        path = Path(path)
        data = json.loads(path.read_text())
        root = path.parent
        library = [
            LibraryClip(c["id"], root / c["path"], c["source"], c["start_s"], c["duration_s"]) for c in data["library"]
        ]
        queries = [
            Query(
                q["id"],
                root / q["path"],
                q["edit"],
                q["positive"],
                q["source"],
                q["start_s"],
                q["duration_s"],
            )
            for q in data["queries"]
        ]
        return cls(library, queries, data.get("spec", {}))

    def save(self, path: Path) -> Path:
        root = Path(path).parent

        def rel(p: Path) -> str:
            return Path(os.path.relpath(p, root)).as_posix()

        data = {
            "version": FORMAT_VERSION,
            "spec": self.spec,
            "library": [{**dataclasses.asdict(c), "path": rel(c.path)} for c in self.library],
            "queries": [{**dataclasses.asdict(q), "path": rel(q.path)} for q in self.queries],
        }
        return write_atomic(Path(path), json.dumps(data, indent=1).encode())
