"""How an index version is built and searched (``IndexParams``, recorded in each
``IndexVersion.params``), and the parameters the settings ask for."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from app.config import Settings

# The search expansion (ef) a version is served with unless set, by mode, measured at 1M
# vectors (scripts/bench_index.py): f16 HNSW recall@5 0.995 at 96 (p99 0.92 ms); hash
# codes re-ranked with the stored embeddings 0.990 at 128, 0.996 at 256.
DEFAULT_EXPANSION_SEARCH = {"hnsw": 96, "hash": 256}


@dataclass(frozen=True)
class IndexParams:
    """How a version is built and searched; stored in ``IndexVersion.params``.

    Two coarse representations search the graph (``mode``): ``hnsw``, the (optionally
    PCA-reduced) vectors stored as f32, f16 or i8; ``hash``, binary codes searched by
    Hamming distance. Candidates can then be re-ranked by exact cosine (``rerank``,
    ``rerank_from``), so the scores returned are cosines of the embeddings themselves."""

    mode: Literal["hnsw", "hash"] = "hnsw"
    dtype: Literal["f32", "f16", "i8"] = "f16"  # hnsw storage (hash: always b1)
    connectivity: int = 16  # HNSW M: links per node (level 0 has 2M)
    expansion_add: int = 128  # ef at build time
    # ef at query time (raised to the count asked for); None: DEFAULT_EXPANSION_SEARCH
    expansion_search: int | None = None
    shards: int = 1
    pca_dim: int | None = None  # learned reduction before indexing (None: full dimension)
    pca_whiten: bool = False
    hash_bits: int | None = None  # None: the (reduced) dimension, rounded down to 8
    hash_rotation: Literal["none", "pca", "itq"] = "itq"
    rerank: int = 0  # candidates re-ranked by exact cosine of the embeddings (0: off)
    # Where re-ranking reads the candidates' embeddings: ``file``, a float copy written
    # beside the graph (rerank_dtype; fastest, ~2 bytes per dimension per video more on
    # disk); ``database``, the caller's ``vectors_of`` (the system of record, one read of
    # ``rerank`` rows per search; the version keeps only graph and codes).
    rerank_from: Literal["file", "database"] = "file"
    rerank_dtype: Literal["f32", "f16"] = "f16"
    background: int = 1000  # library vectors kept for calibrated scores
    # A shard this small is scanned exactly instead of walking its graph (search-time):
    # a scan of a few thousand vectors costs well under a millisecond, and HNSW can miss
    # vectors of data without neighbourhood structure (random vectors, tiny libraries).
    exact_below: int = 5000
    fit_sample: int = 20_000  # vectors the PCA / ITQ are learned on
    # Threads inserting into one graph (0: all cores). More than one strands nodes that
    # no search reaches (usearch#735; measured self-recall 0.998 with 2 threads against
    # 0.9996 with one at 100k); shards build in parallel instead.
    build_threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("hnsw", "hash"):
            raise ValueError(f"unknown index mode {self.mode!r}")
        if self.expansion_search is None:
            object.__setattr__(self, "expansion_search", DEFAULT_EXPANSION_SEARCH[self.mode])
        if self.dtype not in ("f32", "f16", "i8"):
            raise ValueError(f"unknown index dtype {self.dtype!r}")
        # Scores must be cosines of the embeddings (they are merged with exact scores of
        # fresh additions and calibrated): Hamming or reduced-space scores are re-ranked.
        if self.mode == "hash" and self.rerank <= 0:
            raise ValueError("hash mode needs rerank > 0 (Hamming distances are not cosines)")
        if self.pca_dim is not None and self.rerank <= 0:
            raise ValueError("a PCA-reduced index needs rerank > 0 (reduced-space scores are not cosines)")
        if self.rerank_from not in ("file", "database"):
            raise ValueError(f"unknown rerank_from {self.rerank_from!r}")
        if self.shards < 1 or self.connectivity < 2:
            raise ValueError("shards must be >= 1 and connectivity >= 2")

    @property
    def storage(self) -> str:
        return "b1" if self.mode == "hash" else self.dtype

    @property
    def float_copy(self) -> bool:
        """Whether the version keeps a float copy of its vectors to re-rank with."""
        return self.rerank > 0 and self.rerank_from == "file"

    @property
    def reranks_from_database(self) -> bool:
        return self.rerank > 0 and self.rerank_from == "database"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexParams:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def index_params(settings: Settings, *, dtype: str | None = None) -> IndexParams:
    """The build parameters the settings ask for (``dtype`` overrides index_dtype)."""
    reduced = settings.pca_dim is not None
    rerank = settings.index_rerank
    if rerank is None:
        rerank = 100 if settings.index_mode == "hash" or reduced else 0
    return IndexParams(
        mode=settings.index_mode,
        dtype=dtype or settings.index_dtype,  # type: ignore[arg-type]
        connectivity=settings.index_connectivity,
        expansion_add=settings.index_expansion_add,
        expansion_search=settings.index_expansion_search,
        shards=settings.index_shards,
        pca_dim=settings.pca_dim,
        pca_whiten=settings.pca_whiten,
        hash_bits=settings.hash_bits,
        hash_rotation=settings.hash_rotation,
        rerank=rerank,
        rerank_from=settings.index_rerank_from,
        rerank_dtype=settings.index_rerank_dtype,
    )
