"""The benchmark's answer file, ``ground_truth.json``: the sources and the part each belongs
to, the library clips, the queries, and for each query the library clip it copies (None
for a negative).

The footage is split **by source** into two parts (:data:`PARTS`): ``dev``, on which every
choice (recipe, preset, threshold, setting) is made, and ``test``, which is only scored.
Each part is a benchmark of its own: its queries copy, and its negatives and insertions
are cut from, its own sources only. Every source, library clip and query is recorded by
content (sha256 and size), so training can refuse a query file or any footage of the test
part wherever it lies (:mod:`app.learn.train.guards`).

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
FORMAT_VERSION = 2  # of ground_truth.json; also part of a benchmark's spec (2: parts, fingerprints)
DEV, TEST = "dev", "test"
PARTS = (DEV, TEST)  # in report order


@dataclass(frozen=True)
class SourceRecord:
    """A video the benchmark was cut from: its part, and its content fingerprint."""

    name: str
    part: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class LibraryClip:
    id: str
    path: Path
    source: str
    start_s: float  # where the clip starts in its source
    duration_s: float
    part: str = DEV  # its source's
    sha256: str = ""
    bytes: int = 0
    # A library video no query copies (its own source, whole): what a real library holds
    # besides the copied ones, so that the first stage has to find a copy's source among many.
    distractor: bool = False


@dataclass(frozen=True)
class Query:
    id: str
    path: Path
    edit: str  # edit names joined by "+", e.g. "hflip+insertion"
    positive: str | None  # the library clip it copies, None for a negative
    source: str
    start_s: float  # the copied stretch: in the library clip (positive) or source (negative)
    duration_s: float
    part: str = DEV  # its source's
    sha256: str = ""
    bytes: int = 0

    @property
    def edits(self) -> tuple[str, ...]:
        return tuple(self.edit.split("+"))


@dataclass(frozen=True)
class GroundTruth:
    library: list[LibraryClip]
    queries: list[Query]
    spec: dict[str, Any] = field(default_factory=dict)
    sources: list[SourceRecord] = field(default_factory=list)

    @property
    def positives(self) -> list[int | None]:
        """For each query, the library column of its copy, or None."""
        column = {clip.id: i for i, clip in enumerate(self.library)}
        return [None if q.positive is None else column[q.positive] for q in self.queries]

    @property
    def parts(self) -> list[str]:
        """The parts that hold queries, in :data:`PARTS` order."""
        present = {q.part for q in self.queries}
        return [p for p in PARTS if p in present]

    def part(self, name: str) -> GroundTruth:
        """The benchmark of one part alone: its sources, library clips and queries."""
        if name not in PARTS:
            raise ValueError(f"unknown part {name!r}; the parts are {PARTS}")
        return GroundTruth(
            [c for c in self.library if c.part == name],
            [q for q in self.queries if q.part == name],
            self.spec,
            [s for s in self.sources if s.part == name],
        )

    def forbidden_in_training(self) -> dict[str, str]:
        """sha256 -> what it is, for every file no training run may see: each query (its
        edits are what the benchmark measures invariance to), and every test-part source
        and library clip, distractors included (footage that must stay unseen for the test
        part to mean anything)."""
        out = {q.sha256: f"query {q.id}" for q in self.queries if q.sha256}
        out |= {s.sha256: f"test-part source {s.name}" for s in self.sources if s.part == TEST and s.sha256}
        out |= {
            c.sha256: f"test-part distractor {c.id}"
            if c.distractor
            else f"library clip {c.id} of test-part source {c.source}"
            for c in self.library
            if c.part == TEST and c.sha256
        }
        return out

    def forbidden_sizes(self) -> set[int]:
        """The sizes in bytes of the files of :meth:`forbidden_in_training` (a video of
        another size needs no hashing to be cleared)."""
        forbidden = self.forbidden_in_training()
        items: list[Query | SourceRecord | LibraryClip] = [*self.queries, *self.sources, *self.library]
        return {i.bytes for i in items if i.sha256 in forbidden}

    @classmethod
    def load(cls, path: Path) -> GroundTruth:
        path = Path(path)
        data = json.loads(path.read_text())
        root = path.parent

        def fields_of(item: dict[str, Any]) -> dict[str, Any]:
            # Format 1 had no parts: everything was tuned on, so all of it is dev.
            return {"part": item.get("part", DEV), "sha256": item.get("sha256", ""), "bytes": item.get("bytes", 0)}

        library = [
            LibraryClip(
                c["id"],
                root / c["path"],
                c["source"],
                c["start_s"],
                c["duration_s"],
                **fields_of(c),
                distractor=bool(c.get("distractor", False)),
            )
            for c in data["library"]
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
                **fields_of(q),
            )
            for q in data["queries"]
        ]
        sources = [SourceRecord(s["name"], s["part"], s["sha256"], s["bytes"]) for s in data.get("sources", [])]
        return cls(library, queries, data.get("spec", {}), sources)

    def save(self, path: Path) -> Path:
        root = Path(path).parent

        def rel(p: Path) -> str:
            return Path(os.path.relpath(p, root)).as_posix()

        data = {
            "version": FORMAT_VERSION,
            "spec": self.spec,
            "sources": [dataclasses.asdict(s) for s in self.sources],
            "library": [{**dataclasses.asdict(c), "path": rel(c.path)} for c in self.library],
            "queries": [{**dataclasses.asdict(q), "path": rel(q.path)} for q in self.queries],
        }
        return write_atomic(Path(path), json.dumps(data, indent=1).encode())
