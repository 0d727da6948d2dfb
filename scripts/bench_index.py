"""Index benchmark: recall, latency, throughput, build time and size of each storage mode
against exact search, on clustered vectors with a realistic neighbourhood structure.

    python -m scripts.bench_index --n 1000000 --dim 512 --queries 1000 --out bench/index

Every mode is built with :func:`app.index.build.build_version` and searched through
:class:`app.index.version.IndexVersionFiles`, exactly as workers serve it (files written, checked
and memory-mapped; per-query Python overhead included). The reference is exact cosine
search in numpy (batched), measured in the same run.

The vectors (``clustered``): topics, clusters within topics, videos within clusters,
10% of the library near-duplicates of another video (re-uploads, light edits), a shared
offset and a decaying spectrum (real embeddings are anisotropic, so raw cosines are high
everywhere). Half the queries are perturbed copies of library videos (an edited copy
selected in the chat), half new videos from a random cluster.

Also measured: near-duplicate flags (raw cosine and calibrated score thresholds, their
precision and recall on the known copies among each query's exact top k), and with
``--real DIR`` the same on the retrieval benchmark's real clips (``app.evaluate.generate``).

Outputs a table, ``OUT/bench_index.json`` and ``OUT/bench_index.png``.

Batch figures (``batch q/s``) of the exact reference and of every mode use the same
``--threads`` (default: every core; the table's title says how many); single-query
latencies run on one thread, as a serving worker's search does.

Budget on a busy 2-core machine: at 1M x 512, generating takes ~25 s, the exact
reference 45-90 s (1000 queries, one thread), a hash build ~7 min; an f16 HNSW
build took 10 min at 500k, so ``--modes f16`` at 1M needs ~25 min. ``--modes`` picks
what to build; ``--ef`` and ``--rerank`` lists are swept at search time on each build.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# One BLAS thread per product, as in a serving worker process: on a small shared machine
# a multi-threaded OpenBLAS makes every small matrix-vector product wait for its threads
# (measured here: 3000 x 256 products 25x slower under load). Batches use --threads
# threads of their own (``exact_topk``). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from rich.console import Console
from rich.table import Table

from app.config import Settings
from app.index.build import build_version
from app.index.calibrate import calibrate, calibration_reference
from app.index.params import IndexParams
from app.index.transform import normalise
from app.index.version import IndexVersionFiles, VectorsOf

NEAR_DUPLICATE_THRESHOLD = Settings.model_fields["near_duplicate_threshold"].default

# Named modes: build parameters on top of the command line's knobs.
MODES: dict[str, dict[str, Any]] = {
    "f32": {"mode": "hnsw", "dtype": "f32"},
    "f16": {"mode": "hnsw", "dtype": "f16"},
    "i8": {"mode": "hnsw", "dtype": "i8"},
    "i8-rerank": {"mode": "hnsw", "dtype": "i8", "rerank": "RERANK"},
    # hash modes re-rank from the database as served (a scratch database holds the
    # vectors, loaded through the real schema), "-file" ones from a copy beside the index
    "hash": {"mode": "hash", "hash_rotation": "itq", "rerank_from": "database"},
    "hash-file": {"mode": "hash", "hash_rotation": "itq"},
    "hash-pca": {"mode": "hash", "hash_rotation": "pca"},
    "hash-sign": {"mode": "hash", "hash_rotation": "none"},
    "pca": {"mode": "hnsw", "dtype": "f16", "pca_dim": "PCA"},
    "pca-i8": {"mode": "hnsw", "dtype": "i8", "pca_dim": "PCA"},
    "f16-shards": {"mode": "hnsw", "dtype": "f16", "shards": "SHARDS"},
    "hash-shards": {"mode": "hash", "hash_rotation": "itq", "shards": "SHARDS", "rerank_from": "database"},
    "f16-mt": {"mode": "hnsw", "dtype": "f16", "build_threads": 0},
}


@dataclass
class Data:
    library: np.ndarray  # (N, D) L2-normalised
    queries: np.ndarray  # (Q, D) L2-normalised
    family: np.ndarray  # (N,) near-duplicate family of each library video
    query_family: np.ndarray  # (Q,) family a query copies, -1 for a new video


def clustered(n: int, dim: int, *, queries: int, seed: int = 0, per_cluster: int = 50, per_topic: int = 20,
              duplicates: float = 0.1) -> Data:  # fmt: skip
    """Hierarchically clustered vectors: n / per_cluster clusters (20k at a million) in
    topics of ``per_topic`` clusters, plus near-duplicate families (see the module doc)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // per_cluster)
    n_topics = max(1, n_clusters // per_topic)
    spectrum = (1.0 + np.arange(dim, dtype=np.float32)) ** -0.5
    spectrum /= np.sqrt((spectrum**2).sum())  # (D,) expected unit norm per unit of noise
    offset = np.abs(rng.standard_normal(dim)).astype(np.float32)
    offset *= 1.2 / np.linalg.norm(offset)

    def noise(rows: int, level: float) -> np.ndarray:
        return level * rng.standard_normal((rows, dim), dtype=np.float32) * spectrum

    topics = noise(n_topics, 1.0)
    centres = topics[rng.integers(0, n_topics, n_clusters)] + noise(n_clusters, 0.7)
    cluster = rng.integers(0, n_clusters, n)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):  # (chunks keep the temporary noise small)
        e = min(n, s + 100_000)
        x[s:e] = centres[cluster[s:e]] + noise(e - s, 0.5) + offset
    family = np.arange(n)
    n_dup = int(n * duplicates)
    copies = rng.choice(n, n_dup, replace=False)
    sources = rng.integers(0, n, n_dup)
    keep = ~np.isin(sources, copies)  # a copy of a copy would chain families
    copies, sources = copies[keep], sources[keep]
    x[copies] = x[sources] + noise(len(copies), 0.1)
    family[copies] = family[sources]
    half = queries // 2
    src = rng.integers(0, n, half)
    q = np.concatenate([x[src] + noise(half, 0.1), centres[rng.integers(0, n_clusters, queries - half)] +
                        noise(queries - half, 0.5) + offset])  # fmt: skip
    query_family = np.concatenate([family[src], np.full(queries - half, -1)])
    return Data(normalise(x), normalise(q), family, query_family)


def exact_topk(library: np.ndarray, queries: np.ndarray, k: int, *, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top ``k`` (rows of ``library``) of each query, batched: (Q, k) each.
    Blocks of queries are spread over ``threads`` threads, each product on one BLAS thread
    (numpy releases the GIL), as USearch's batch search spreads queries over its threads."""
    threads = max(1, threads)
    block = int(np.clip(2**28 // (4 * max(1, len(library)) * threads), 16, 256))  # (block, N) scores: <= 256 MB in all
    block = max(1, min(block, -(-len(queries) // threads)))  # every thread gets a block
    rows = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)

    def search_block(s: int) -> None:
        sims = queries[s : s + block] @ library.T  # (B, N)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(sims, top, 1)
        order = np.argsort(-top_scores, axis=1)
        rows[s : s + block] = np.take_along_axis(top, order, 1)
        scores[s : s + block] = np.take_along_axis(top_scores, order, 1)

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(search_block, range(0, len(queries), block)))
    return rows, scores


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth, strict=True)]))


def _pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p)) if values else float("nan")


@dataclass
class Row:
    mode: str
    n: int
    dim: int
    storage: str
    params: dict[str, Any]
    recall: float
    p50_ms: float
    p99_ms: float
    p99_cpu_ms: float  # process CPU time (all threads: shards search in a pool)
    batch_qps: float
    build_s: float
    bytes_per_video: float
    hot_bytes_per_video: float
    extra: dict[str, Any] = field(default_factory=dict)


def _latency(search: Callable[[np.ndarray], Any], queries: np.ndarray) -> tuple[list[float], list[float], list[Any]]:
    wall, cpu, found = [], [], []
    for q in queries[: min(50, len(queries))]:  # warm-up: page in the memory maps
        search(q)
    gc.collect()
    gc.disable()  # a collection in the middle of a query is not the index's latency
    try:
        for q in queries:
            t0, c0 = time.perf_counter(), time.process_time()
            result = search(q)
            cpu.append((time.process_time() - c0) * 1000)
            wall.append((time.perf_counter() - t0) * 1000)
            found.append(result)
    finally:
        gc.enable()
    return wall, cpu, found


def bench_exact(data: Data, k: int, *, latency_queries: int, threads: int) -> tuple[Row, np.ndarray]:
    n, dim = data.library.shape
    t0 = time.perf_counter()
    truth, _ = exact_topk(data.library, data.queries, k, threads=threads)
    batch_s = time.perf_counter() - t0
    subset = data.queries[:latency_queries]
    wall, cpu, _ = _latency(lambda q: np.argpartition(-(data.library @ q), k)[:k], subset)
    row = Row("exact (numpy)", n, dim, "f32", {}, 1.0, _pct(wall, 50), _pct(wall, 99), _pct(cpu, 99),
              len(data.queries) / batch_s, 0.0, 4.0 * dim + 8, 4.0 * dim + 8,
              {"latency_queries": len(subset), "batch_threads": threads})  # fmt: skip
    return row, truth


def bench_mode(name: str, params: IndexParams, data: Data, truth: np.ndarray, *, k: int, workdir: Path,
               efs: list[int | None], reranks: list[int], threads: int,
               vectors_of: VectorsOf | None = None) -> list[Row]:  # fmt: skip
    n, dim = data.library.shape
    directory = workdir / name
    shutil.rmtree(directory, ignore_errors=True)
    built = build_version(keys=np.arange(n), vectors=data.library, directory=directory, params=params)
    opened = IndexVersionFiles.view(built.path, sha256=built.sha256, dim=dim)
    rows = []
    for ef in efs:
        for rerank in reranks if params.rerank > 0 else [0]:
            opened.configure(expansion_search=ef, rerank=rerank or None)
            wall, cpu, found = _latency(lambda q: opened.search(q, k, vectors_of=vectors_of), data.queries)
            keys = np.array([[h.key for h in hits] + [-1] * (k - len(hits)) for hits in found])
            t0 = time.perf_counter()
            batch_keys, _ = opened.search_batch(data.queries, k, threads=threads, vectors_of=vectors_of)
            batch_s = time.perf_counter() - t0
            row = Row(name, n, dim, params.storage, {**opened.params.to_dict()}, recall_at(keys, truth),
                      _pct(wall, 50), _pct(wall, 99), _pct(cpu, 99), len(data.queries) / batch_s, built.seconds,
                      opened.nbytes / n, opened.hot_bytes / n,
                      {"batch_recall": recall_at(batch_keys, truth), "batch_threads": threads,
                       "timings": opened.manifest["timings"],
                       "self_recall": [info["self_recall"] for info in opened.manifest["shards"]]})  # fmt: skip
            rows.append(row)
            logging.getLogger("bench").info("%s ef=%d rerank=%d: recall %.4f p50 %.3f p99 %.3f ms",
                                            name, opened.params.expansion_search, rerank, row.recall, row.p50_ms,
                                            row.p99_ms)  # fmt: skip
    shutil.rmtree(directory, ignore_errors=True)
    return rows


class Store:
    """The vectors as the system of record holds them: a scratch database migrated to the
    served schema, one video and one float32 embedding row per vector (video id = row
    + 1), read back through ``app.index.queries.stored_vectors`` as a re-ranking worker does."""

    NAME = "vidsim_bench_index"

    def __init__(self, library: np.ndarray) -> None:
        from scripts.local_services import use_local_services

        self.drop()  # what an interrupted run left
        os.environ.pop("DATABASE_URL", None)
        use_local_services(self.NAME)
        from sqlalchemy.orm import Session

        from app.db import get_engine, migrate
        from app.models import ModelVersion

        t0 = time.perf_counter()
        migrate()
        self.engine = get_engine()
        n, self.dim = library.shape
        with Session(self.engine) as session:
            model = ModelVersion(name="bench", dim=self.dim, status="active", is_active=True)
            session.add(model)
            session.commit()
            self.model_id = model.id
        with self.engine.begin() as sa_conn:
            conn = sa_conn.connection.driver_connection  # psycopg: COPY streams the rows
            assert conn is not None
            with conn.cursor().copy("COPY videos (id, uri, in_library, enabled, status, created_at, updated_at)"
                                    " FROM STDIN") as copy:  # fmt: skip
                for i in range(n):
                    copy.write_row((i + 1, f"bench://{i + 1}", True, True, "ready", "now", "now"))
            with conn.cursor().copy("COPY embeddings (video_id, model_version_id, vector, dim, frames, created_at)"
                                    " FROM STDIN") as copy:  # fmt: skip
                for i in range(n):
                    copy.write_row((i + 1, self.model_id, library[i].tobytes(), self.dim, 1, "now"))
            conn.execute("ANALYZE videos; ANALYZE embeddings")
        self.load_s = time.perf_counter() - t0
        with self.engine.connect() as conn:
            self.bytes = conn.exec_driver_sql("SELECT pg_total_relation_size('embeddings')").scalar_one()
        logging.getLogger("bench").info("loaded %d embeddings into database %s in %.0fs (%.0f bytes/row)", n,
                                        self.NAME, self.load_s, self.bytes / max(1, n))  # fmt: skip
        self.session = Session(self.engine)  # the reads share one transaction, as within a worker's event

    @classmethod
    def drop(cls) -> None:
        """Removes the scratch database (~3 GB at a million vectors)."""
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{cls.NAME}" WITH (FORCE)')

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """``app.index.version.VectorsOf`` for index keys that are row numbers."""
        from app.index.queries import stored_vectors

        video_ids = np.asarray(rows, dtype=np.int64) + 1
        return stored_vectors(session=self.session, model_id=self.model_id, dim=self.dim, video_ids=video_ids)

    def close(self) -> None:
        self.session.close()
        self.engine.dispose()
        self.drop()


def calibrations(cos: np.ndarray, query: np.ndarray, background: np.ndarray) -> dict[str, np.ndarray]:
    """Ways to score the results ``cos`` (R,) of one query: the raw cosine, the z-score
    against the query's background similarities, and the served calibration
    (``app.index.calibrate.calibrate``)."""
    sims = background @ query  # (B,)
    return {
        "cosine": cos,
        "z": (cos - sims.mean()) / max(float(sims.std()), 1e-6),
        "calibrated": np.asarray(calibrate(cos, calibration_reference(query, background))),
    }


def near_duplicates(labels: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """For each way of scoring pairs (pairs,): the average precision of flagging pairs
    in score order, and the lowest threshold keeping precision >= 0.99 / 0.95 / 0.9
    with the precision and recall there."""
    out: dict[str, Any] = {"pairs": len(labels), "positives": int(labels.sum())}
    for name, values in scores.items():
        order = np.argsort(-values, kind="stable")
        hits = labels[order]
        tp = np.cumsum(hits)
        precision = tp / np.arange(1, len(hits) + 1)
        recall = tp / max(1, labels.sum())
        picks = {}
        for target in (0.99, 0.95, 0.9):
            ok = np.flatnonzero(precision >= target)
            if len(ok):
                i = int(ok.max())  # the most pairs flagged at that precision
                picks[str(target)] = {"threshold": float(values[order][i]), "precision": float(precision[i]),
                                      "recall": float(recall[i])}  # fmt: skip
        ap = float((precision * hits).sum() / max(1, labels.sum()))
        out[name] = {"average_precision": ap, "at_precision": picks}
    flagged = scores["calibrated"] >= NEAR_DUPLICATE_THRESHOLD
    out["served_threshold"] = {
        "threshold": NEAR_DUPLICATE_THRESHOLD,
        "flagged": int(flagged.sum()),
        "precision": float(labels[flagged].mean()) if flagged.any() else float("nan"),
        "recall": float(labels[flagged].sum() / max(1, labels.sum())),
    }
    return out


def _pooled(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def synthetic_near_duplicates(data: Data, truth: np.ndarray, background: int, seed: int) -> dict[str, Any]:
    """Each query's exact top k: a result is a near-duplicate when it is of the family the
    query copies (the other results are its nearest neighbours, the hard negatives)."""
    rng = np.random.default_rng(seed + 1)
    bg = data.library[np.sort(rng.choice(len(data.library), min(background, len(data.library)), replace=False))]
    parts, labels = [], []
    for q, rows, fam in zip(data.queries, truth, data.query_family, strict=True):
        parts.append(calibrations(data.library[rows] @ q, q, bg))
        labels.append((data.family[rows] == fam) & (fam >= 0))
    return near_duplicates(np.concatenate(labels), _pooled(parts))


def real_near_duplicates(ground_truth: Path) -> dict[str, Any]:
    """The retrieval benchmark's real clips through the untrained encoder (what serves
    until one is trained): every (query, library clip) pair, a query's copy its only
    positive. Average precision over all pairs is VSC22's µAP, which rewards scores that
    are comparable across queries. The background is the library itself (it is small),
    without the clip being scored: a large library's sample rarely holds the candidate."""
    from app.evaluate.ground_truth import GroundTruth
    from app.learn.encoder import INITIAL_CONFIG, initial_encoder
    from app.media import video as video_io

    gt = GroundTruth.load(ground_truth)
    model = initial_encoder(INITIAL_CONFIG)

    def embed(paths: list[Path]) -> np.ndarray:
        clips = [video_io.sample_frames(p, fps=1.0, size=model.config.frame_size, max_frames=64).frames for p in paths]
        return np.concatenate([model.embed(clips[i : i + 8]) for i in range(0, len(clips), 8)])

    t0 = time.perf_counter()
    library = normalise(embed([c.path for c in gt.library]))
    queries = normalise(embed([q.path for q in gt.queries]))
    seconds = time.perf_counter() - t0
    labels = np.zeros((len(queries), len(library)), dtype=bool)
    for i, col in enumerate(gt.positives):
        if col is not None:
            labels[i, col] = True
    parts = []
    for q in queries:
        sims = library @ q  # (L,)
        scored = [calibrations(sims[j : j + 1], q, np.delete(library, j, axis=0)) for j in range(len(library))]
        parts.append(_pooled(scored))
    out = near_duplicates(labels.ravel(), _pooled(parts))
    out.update(library=len(library), queries=len(queries), embed_s=seconds)
    return out


def _table(rows: list[Row], console: Console, *, threads: int) -> None:
    title = f"index benchmark (recall@k vs exact numpy; batch q/s on {threads} thread(s) each, single queries on one)"
    table = Table(title=title)
    for col in ("mode", "n x dim", "storage", "ef", "rerank", "recall", "p50 ms", "p99 ms", "p99 cpu ms",
                "batch q/s", "build s", "B/video", "hot B/video"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("mode", "storage") else "right")
    for r in rows:
        table.add_row(r.mode, f"{r.n:,} x {r.dim}", r.storage, str(r.params.get("expansion_search", "")),
                      str(r.params.get("rerank", "")), f"{r.recall:.4f}", f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}",
                      f"{r.p99_cpu_ms:.3f}", f"{r.batch_qps:,.0f}", f"{r.build_s:.1f}", f"{r.bytes_per_video:,.0f}",
                      f"{r.hot_bytes_per_video:,.0f}")  # fmt: skip
    console.print(table)


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    modes = sorted({(r.mode, r.n) for r in rows if not r.mode.startswith("exact")}, key=str)
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(modes)}
    for r in rows:
        if r.mode.startswith("exact"):
            continue
        colour = colours[(r.mode, r.n)]
        label = f"{r.mode} ({r.n // 1000}k x {r.dim})"
        tag = f"ef{r.params.get('expansion_search')}" + (f"/rr{r.params['rerank']}" if r.params.get("rerank") else "")
        ax1.scatter(r.p50_ms, r.recall, s=30, color=colour, label=label)
        ax1.annotate(tag, (r.p50_ms, r.recall), fontsize=6, xytext=(3, 2), textcoords="offset points")
        # o: bytes kept in memory (graph, codes), x: all files (with the re-ranking copy)
        ax2.plot([r.hot_bytes_per_video, r.bytes_per_video], [r.recall, r.recall], color=colour, lw=0.8)
        ax2.scatter(r.hot_bytes_per_video, r.recall, s=30, marker="o", color=colour)
        ax2.scatter(r.bytes_per_video, r.recall, s=30, marker="x", color=colour)
    handles, labels = ax1.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax1.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    ax1.set(xlabel="p50 single-query latency (ms)", ylabel="recall@k vs exact", title="recall vs latency")
    ax1.axhline(0.99, ls=":", c="grey")
    ax1.axvline(1.0, ls=":", c="grey")
    ax2.set(xscale="log", xlabel="bytes per video (o: kept in memory, x: all files)", ylabel="recall@k vs exact",
            title="recall vs size")  # fmt: skip
    ax2.axvline(600, ls=":", c="grey")
    ax2.axhline(0.99, ls=":", c="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_index", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="library size")
    p.add_argument("--dim", type=int, default=512, help="dimension (served today: 512; projector: 4096)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--modes", default="f32,f16,i8,hash,pca", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--connectivity", type=int, default=IndexParams.connectivity)
    p.add_argument("--expansion-add", type=int, default=IndexParams.expansion_add)
    p.add_argument("--ef", help="search expansions to try, e.g. 32,64 (default: each mode's served default)")
    p.add_argument("--rerank", default="100", help="candidates re-ranked (hash, pca), e.g. 50,100")
    p.add_argument("--rerank-dtype", default="f16", choices=["f32", "f16"])
    p.add_argument("--pca-dim", type=int, default=128)
    p.add_argument("--shards", type=int, default=4, help="shards of the f16-shards mode")
    p.add_argument("--exact-latency-queries", type=int, default=100, help="single-query latency of exact search")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads of every batch search, exact and USearch alike (default: every core)")  # fmt: skip
    p.add_argument("--real", type=Path, help="a retrieval benchmark's ground_truth.json: near-duplicates on real clips")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, help="where index files are built (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("VIDSIM_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    console = Console(width=200)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        console.print(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
        return 2
    efs: list[int | None] = [int(v) for v in args.ef.split(",")] if args.ef else [None]
    reranks = [int(v) for v in args.rerank.split(",")]
    started = time.perf_counter()
    t0 = time.perf_counter()
    data = clustered(args.n, args.dim, queries=args.queries, seed=args.seed)
    generate_s = time.perf_counter() - t0
    threads = max(1, args.threads)
    exact_row, truth = bench_exact(data, args.k, latency_queries=args.exact_latency_queries, threads=threads)
    rows = [exact_row]
    console.print(f"generated {args.n:,} x {args.dim} in {generate_s:.1f}s; exact: {exact_row.batch_qps:.0f} q/s "
                  f"batched on {threads} thread(s)")  # fmt: skip
    base = IndexParams(connectivity=args.connectivity, expansion_add=args.expansion_add,
                       rerank_dtype=args.rerank_dtype, seed=args.seed)  # fmt: skip
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-index-"))
    store = None
    try:
        for name in modes:
            knobs = {"PCA": args.pca_dim, "SHARDS": args.shards, "RERANK": reranks[0]}
            spec = {k: knobs.get(v, v) if isinstance(v, str) else v for k, v in MODES[name].items()}
            if spec.get("mode") == "hash" or "pca_dim" in spec:
                spec["rerank"] = reranks[0]
            if spec.get("rerank_from") == "database" and store is None:
                store = Store(data.library)
            params = replace(base, **spec, expansion_search=efs[0])  # (None: the mode's default)
            rows += bench_mode(name, params, data, truth, k=args.k, workdir=workdir, efs=efs,
                               reranks=reranks, threads=threads,
                               vectors_of=store.vectors_of if store else None)  # fmt: skip
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        if store is not None:
            store.close()
    dup = {"synthetic": synthetic_near_duplicates(data, truth, IndexParams.background, args.seed)}
    if args.real:
        dup["real"] = real_near_duplicates(args.real)
    _table(rows, console, threads=threads)
    console.print_json(json.dumps(dup))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join(["python -m scripts.bench_index", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
        "n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k, "batch_threads": threads,
        "generate_s": generate_s, "total_s": time.perf_counter() - started,
        "database": {"load_s": store.load_s, "embeddings_bytes_per_video": store.bytes / args.n} if store else None,
        "rows": [r.__dict__ for r in rows],
        "near_duplicates": dup,
    }  # fmt: skip
    (args.out / "bench_index.json").write_text(json.dumps(report, indent=1, default=float))
    _plot(rows, args.out / "bench_index.png")
    console.print(f"wrote {args.out / 'bench_index.json'} and {args.out / 'bench_index.png'} "
                  f"({time.perf_counter() - started:.0f}s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
