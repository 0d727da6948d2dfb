"""Search results by cosine (``Hit``): the exact scan over a few vectors, and merging
the result lists of shards, of an index version and of the fresh additions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Hit:
    key: int
    score: float  # cosine similarity, 1.0 = same direction


def exact_search(keys: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int) -> list[Hit]:
    """Brute-force cosine search over L2-normalised ``vectors`` (N, D)."""
    if len(keys) == 0 or k <= 0:
        return []
    scores = vectors @ np.asarray(query, dtype=np.float32)  # (N,)
    top = np.argpartition(-scores, min(k, len(scores)) - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [Hit(int(keys[i]), float(scores[i])) for i in top]


def merge(*hit_lists: list[Hit], k: int) -> list[Hit]:
    """Best score per key across lists, top ``k`` (ties broken by key, so the merge of
    shards does not depend on their order)."""
    best: dict[int, float] = {}
    for hits in hit_lists:
        for hit in hits:
            if hit.score > best.get(hit.key, -np.inf):
                best[hit.key] = hit.score
    return [Hit(key, score) for key, score in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
