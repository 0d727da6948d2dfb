"""`vidsim status`, `vidsim ui` and `vidsim demo`: see what the service is doing, and try it end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from app.config import get_settings
from scripts.commands.common import console, db_session


def demo(
    data_dir: Annotated[Path | None, typer.Option(help="Where the demo keeps its files.")] = None,
    queries: Annotated[int, typer.Option(help="How many edited queries to publish.")] = 8,
    train_steps: Annotated[
        int, typer.Option(help="Barlow Twins steps to pre-train the demo encoder (0: untrained).")
    ] = 60,
) -> None:
    """Build a demo library from real footage, train an encoder on it without labels, embed
    it, publish events, receive the signed callbacks, and write a results page. Needs no servers."""
    from scripts.demo import run_demo

    run_demo(data_dir=data_dir, max_queries=queries, console=console, train_steps=train_steps)


def status() -> None:
    """Queues, workers, active model and index, pending deliveries, recent failures."""
    from app.ops.status import overview

    with db_session() as session:
        o = overview(session=session)
    console.print(
        f"model: {o.model or 'none'}{'' if o.model_trained else ' (untrained)'}; "
        f"{o.embedded}/{o.library} library videos embedded"
        + (f" (and {o.query_only} query-only videos from events)" if o.query_only else "")
    )
    for r in o.warming:
        failed = (
            f"; {r.given_up.count} given up and skipped (last error: {r.given_up.last_error})"
            if r.given_up.count
            else ""
        )
        console.print(
            f"warming up (embedding the library, then switching): {r.model_id} {r.name}: "
            f"{r.embedded} embedded, {r.to_embed} still to embed{failed}"
        )
    console.print(f"index: {o.index or 'none (exact search)'}; {o.index_lag} newer embeddings searched exactly")
    for run in o.training:
        model = f", model {run.model_id}" if run.model_id is not None else ""
        console.print(
            f"training {run.name}: {run.state}, step {run.step}/{run.total_steps or '?'}, "
            f"{run.chunks} chunk{'' if run.chunks == 1 else 's'} done{model}"
        )
    console.print("events, last hour: " + (", ".join(f"{k} {v}" for k, v in o.events_last_hour.items()) or "none"))
    console.print("deliveries: " + (", ".join(f"{k} {v}" for k, v in o.deliveries.items()) or "none"))
    if o.parked:
        console.print(f"events waiting for an embedding: {o.parked}, the oldest for {o.oldest_parked_s:.0f} s")
    try:
        from workers.app import celery_app
        from workers.metrics import queue_depths

        depths = queue_depths()
        console.print("queues: " + ", ".join(f"{q} {n}" for q, n in depths.items()))
        replies = celery_app.control.ping(timeout=1.0) or []
        console.print(
            f"workers: {len(replies)} answering"
            + (f" ({', '.join(next(iter(r)) for r in replies)})" if replies else "")
        )
    except Exception as exc:
        console.print(f"[yellow]broker unavailable:[/yellow] {exc}")
    if o.failures:
        table = Table("when", "what", "reason", title="recent failures")
        for f in o.failures:
            table.add_row(f"{f.at:%Y-%m-%d %H:%M:%S}", f.what, f.reason)
        console.print(table)


def ui(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    limit: Annotated[int, typer.Option(help="Events shown.")] = 30,
) -> None:
    """Serve the read-only results page: recent events, query frames, recommendations."""
    from app.ops.webui import serve

    console.print(f"results page on http://{host}:{port}/ (Ctrl-C to stop)")
    serve(host=host, port=port, limit=limit, settings=get_settings())
