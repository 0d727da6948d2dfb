"""`vidsim bench ...`: the benchmarks that print the README's figures (each also runs as
`python -m scripts.bench_<name>`)."""

from __future__ import annotations

from typing import Annotated

import typer

from scripts.commands.common import PASS_EXTRA_ARGS, console

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures.")


@bench_app.command("latency", context_settings=PASS_EXTRA_ARGS)
def bench_latency(
    ctx: typer.Context,
    events: Annotated[int, typer.Option(help="Warm events published one after another (0: none).")] = 0,
    cold: Annotated[int, typer.Option(help="Cold (never seen) 60-s videos to publish.")] = 5,
) -> None:
    """Warm events published open loop at fixed rates (the rate -> latency table, CPU per
    event by phase, the Celery round-trip floor, a plot; options: see `python -m
    scripts.load --help`), then cold events beside decode-only time."""
    from scripts.bench_latency import main as bench_main
    from scripts.load import main as load_main

    load_main(list(ctx.args))
    if events or cold:
        bench_main(events=events, cold=cold, console=console)


@bench_app.command("retrieval", context_settings=PASS_EXTRA_ARGS)
def bench_retrieval(ctx: typer.Context) -> None:
    """Copy-detection benchmark: the trained encoder against baselines on the same data
    (options: see `python -m scripts.bench_retrieval --help`)."""
    from scripts.bench_retrieval import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


@bench_app.command("index", context_settings=PASS_EXTRA_ARGS)
def bench_index(ctx: typer.Context) -> None:
    """Index benchmark at scale: recall, latency, memory per storage mode
    (options: see `python -m scripts.bench_index --help`)."""
    from scripts.bench_index import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)) or 0)
