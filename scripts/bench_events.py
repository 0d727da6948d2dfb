"""Retrieval measured through the public event path, as a customer meets it: one part of
a retrieval benchmark (`vidsim bench retrieval`'s ``ground_truth.json``) served by a live
worker, every query published as a ``video_selected`` event naming its file, and the
signed callbacks scored.

    python -m scripts.bench_events --out out/events [--ground-truth GT] [--part test] [--k 10]
        [--checkpoint PATH]

The library clips of the part are registered (their own collection), embedded by the
worker with the serving model (the untrained encoder a fresh install serves, or
``--checkpoint`` registered and activated first) and indexed; each query of the part
(copies and negatives) is then a cold event (``video_uri``, ``k``, the collection), from
fetch to callback. A callback's results are that query's row: each returned video at its
``calibrated`` score, every other library clip tied below them, and the query's copy, when
not returned, last (a miss). The same metrics as the benchmark's (recall@1/5, mAP, µAP; 95 % bootstrap
intervals over the queries; per edit family) come beside the benchmark's own scoring of
the same model on the same part (the dense served-path matrix of
:mod:`app.evaluate.run`), so a gap between what the benchmark reports and what the event
path answers shows. Events lost (no callback) or answered with an error are counted, and
score as queries whose copy was not returned.

Without ``--ground-truth`` the benchmark is cut from the real footage installed here
(seed 0) into ``OUT/bench``. Uses DATABASE_URL / REDIS_URL when set; otherwise a database
of its own on the local Postgres (made afresh each run) and Redis database 12.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from scripts.local_services import use_local_services

EVENTS_DB = "vidsim_events"
METRIC_NAMES = ("recall@1", "recall@5", "mAP", "uAP")


def _fresh_database() -> None:
    """The benchmark's own database, dropped and made again (never a configured one)."""
    if os.environ.get("DATABASE_URL"):
        return
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{EVENTS_DB}" WITH (FORCE)')


def callback_rows(
    answers: dict[str, dict[str, Any] | None], query_ids: list[str], library_ids: list[int],
    positives: list[int | None],
) -> tuple[np.ndarray, dict[str, int]]:  # fmt: skip
    """The (queries x library) score matrix of the callbacks (``answers``: event id -> body,
    None when none came): every clip a callback did not return tied below the lowest score
    returned, except the query's copy (``positives``: its column), which is last: a copy
    not returned (or an event lost or answered with an error) is a miss, never a share of
    a tie. Also the count of lost and errored events."""
    column = {video_id: j for j, video_id in enumerate(library_ids)}
    returned: list[list[tuple[int, float]]] = []
    counts = {"lost": 0, "errored": 0}
    for event_id in query_ids:
        body = answers.get(event_id)
        if body is None or body.get("error"):
            counts["lost" if body is None else "errored"] += 1
            returned.append([])
            continue
        returned.append([(column[r["video_id"]], float(r["calibrated"])) for r in body["results"]
                         if r["video_id"] in column])  # fmt: skip
    scores = [s for row in returned for _, s in row]
    floor = min(scores, default=0.0) - 1.0
    matrix = np.full((len(query_ids), len(library_ids)), floor, dtype=np.float64)
    for i, row in enumerate(returned):
        for j, s in row:
            matrix[i, j] = s
        positive = positives[i]
        if positive is not None and positive not in {j for j, _ in row}:
            matrix[i, positive] = floor - 1.0
    return matrix, counts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_events", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ground-truth", type=Path, help="a benchmark's ground_truth.json (default: cut one here)")
    p.add_argument("--part", default="test", help="the benchmark part to serve (dev or test)")
    p.add_argument("--k", type=int, default=10, help="results asked for per event")
    p.add_argument("--checkpoint", type=Path, help="serve this trained checkpoint (default: the untrained encoder)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the callbacks")
    args = p.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    console = Console()

    from app.evaluate.footage import real_footage
    from app.evaluate.generate import generate
    from app.evaluate.ground_truth import GroundTruth

    gt_path = args.ground_truth
    if gt_path is None:
        gt_path = generate([f.path for f in real_footage(out / "sources")], out / "bench", seed=0, console=console)
    gt = GroundTruth.load(gt_path).part(args.part)
    if not gt.queries:
        raise SystemExit(f"{gt_path} has no {args.part} part")

    os.environ.setdefault("VIDSIM_DATA_DIR", str(out / "service"))
    media = {Path(gt_path).resolve().parent, *(c.path.resolve().parent for c in gt.library),
             *(q.path.resolve().parent for q in gt.queries)}  # fmt: skip
    os.environ.setdefault("VIDSIM_MEDIA_ROOTS", ",".join(sorted(map(str, media))))
    _fresh_database()
    use_local_services(EVENTS_DB)
    results = serve_and_score(gt, gt_path, args, out, console)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "families.png")
    console.print(f"results: {out / 'results.json'}, plot: {out / 'families.png'}")
    return results


def serve_and_score(gt: Any, gt_path: Path, args: argparse.Namespace, out: Path, console: Console) -> dict[str, Any]:
    from sqlalchemy import func, select

    from app.config import get_settings
    from app.db import migrate, session_scope
    from app.evaluate.metrics import score, score_by_family
    from app.evaluate.run import run
    from app.index.rebuild import rebuild_index
    from app.learn import registry
    from app.learn.encoder import load_checkpoint
    from app.media.register import register
    from app.models import Embedding
    from scripts.receiver import CallbackReceiver
    from workers.process import running_worker
    from workers.publish import publish_video_selected
    from workers.tasks import embed_video

    settings = get_settings()
    migrate()
    collection = f"bench-{args.part}"
    with session_scope() as session:
        if args.checkpoint is not None:
            encoder, _ = load_checkpoint(args.checkpoint)
            path = args.checkpoint.resolve()
            model = registry.register_model(session=session, name=f"bench-{args.checkpoint.stem}",
                                            checkpoint_path=path, config=encoder.config)  # fmt: skip
            registry.activate(session=session, model_id=model.id)
        model = registry.active_model(session=session)
        library_ids = [register(session, str(c.path), settings=settings, collection=collection).video_id
                       for c in gt.library]  # fmt: skip
        model_id, model_name = model.id, model.name
    console.print(f"serving {model_name}: {len(library_ids)} library clips, {len(gt.queries)} queries "
                  f"({sum(q.positive is None for q in gt.queries)} negatives) of the {args.part} part")  # fmt: skip
    started = time.monotonic()
    with running_worker(out / "worker.log", pool="prefork", beat=True):
        for video_id in library_ids:
            embed_video.delay(video_id)
        with console.status("the worker embeds the library..."):
            while True:
                embedded = select(func.count()).where(Embedding.video_id.in_(library_ids),
                                                      Embedding.model_version_id == model_id)  # fmt: skip
                with session_scope() as session:
                    done = session.scalar(embedded)
                if done == len(library_ids):
                    break
                if time.monotonic() - started > args.timeout:
                    raise SystemExit(f"the library was not embedded within {args.timeout:g} s ({done} done)")
                time.sleep(0.5)
        with session_scope() as session:
            rebuild_index(session=session, model=registry.active_model(session=session), settings=settings)
        run_tag = uuid.uuid4().hex[:6]
        with CallbackReceiver(settings.webhook_secrets[0]) as receiver:
            event_ids = [
                publish_video_selected(event_id=f"bench-{run_tag}-{q.id}", video_uri=str(q.path.resolve()),
                                       callback_url=receiver.url, k=args.k, collection=collection)
                for q in gt.queries
            ]  # fmt: skip
            with console.status(f"waiting for {len(event_ids)} signed callbacks..."):
                got = receiver.wait_for(set(event_ids), timeout_s=args.timeout)
            rejected = len(receiver.rejected)
    answers = {e: (got[e].payload if e in got else None) for e in event_ids}
    matrix, counts = callback_rows(answers, event_ids, library_ids, gt.positives)
    event_path = score(matrix, gt, resamples=1000)
    families = score_by_family(matrix, gt, resamples=1000)

    # The benchmark's own scoring of the same model on the same clips.
    if args.checkpoint is not None:
        report = run(gt_path, out_dir=out / "benchmark", checkpoints={"benchmark": args.checkpoint}, baselines=(),
                     console=console, show_progress=False)  # fmt: skip
        name = "benchmark"
    else:
        report = run(gt_path, out_dir=out / "benchmark", baselines=("untrained",), console=console,
                     show_progress=False)  # fmt: skip
        name = "untrained"
    dense = report.parts[args.part].systems[name]
    dense_families = report.parts[args.part].families[name]

    table = Table("measure", "event path", f"benchmark's scoring ({name})", title=f"{args.part} part, {model_name}")
    for metric in METRIC_NAMES:
        table.add_row(metric, _cell(event_path, metric), _cell(dense, metric))
    console.print(table)
    by_family = Table("edit family", "queries", "recall@1, event path", "recall@1, benchmark")
    for family, scored in families.items():
        other = dense_families.get(family)
        by_family.add_row(family, str(scored.metrics["positives"]), _cell(scored, "recall@1"),
                          _cell(other, "recall@1") if other else "")  # fmt: skip
    console.print(by_family)
    console.print(f"events: {len(event_ids)} published, {len(got)} answered, {counts['errored']} with an error, "
                  f"{counts['lost']} lost; {rejected} callbacks failed verification")  # fmt: skip
    return {
        "model": model_name,
        "part": args.part,
        "k": args.k,
        "ground_truth": str(gt_path),
        "events": {"published": len(event_ids), "answered": len(got), **counts, "rejected": rejected},
        "event_path": {"metrics": event_path.metrics, "intervals": event_path.intervals},
        "benchmark": {"metrics": dense.metrics, "intervals": dense.intervals},
        "families": {
            f: {"event_path": s.metrics["recall@1"], "benchmark": _recall(dense_families.get(f))}
            for f, s in families.items()
        },
    }


def _recall(scored: Any) -> float | None:
    return scored.metrics["recall@1"] if scored is not None else None


def _cell(scored: Any, metric: str) -> str:
    low, high = scored.intervals[metric]
    return f"{scored.metrics[metric]:.3f} [{low:.2f}, {high:.2f}]"


def plot(results: dict[str, Any], path: Path) -> None:
    """Recall@1 per edit family, the event path's beside the benchmark's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(results["families"])
    x = np.arange(len(families))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(families)), 4))
    ax.bar(x - 0.2, [results["families"][f]["event_path"] for f in families], 0.4, label="event path")
    ax.bar(x + 0.2, [results["families"][f]["benchmark"] or 0.0 for f in families], 0.4, label="benchmark's scoring")
    ax.set_xticks(x, families, rotation=60, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall@1")
    ax.set_title(f"{results['model']}, {results['part']} part", loc="left")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)  # above the bars
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
