"""The ``vidsim`` command: everything an operator does, one verb each."""

from __future__ import annotations

import logging
import os
import sys

import typer

from scripts.commands import bench, db, deliveries, index, library, model, ops, service
from scripts.commands.common import PASS_EXTRA_ARGS, Fail, print_error
from scripts.commands.corpus import corpus_app
from scripts.commands.crawl import crawl_app

# Every command, in the order `vidsim --help` lists them; each lives in scripts/commands/.
app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.command()(ops.demo)
app.command()(library.backfill)
app.command()(model.train)
app.command()(model.finetune)
app.command()(deliveries.publish)
app.command(context_settings=PASS_EXTRA_ARGS)(service.worker)
app.command()(service.beat)
app.command()(ops.status)
app.command()(ops.ui)
app.add_typer(library.library_app, name="library")
app.add_typer(index.index_app, name="index")
app.add_typer(deliveries.deliveries_app, name="deliveries")
app.add_typer(db.db_app, name="db")
app.add_typer(bench.bench_app, name="bench")
app.add_typer(model.model_app, name="model")
app.add_typer(crawl_app, name="crawl")
app.add_typer(corpus_app, name="corpus")


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("VIDSIM_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        exit_code = app(standalone_mode=False)
    except Fail as exc:
        print_error(str(exc), exc.fix)
        sys.exit(1)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # the last line of defence: one readable line, not a traceback
        print_error(f"{type(exc).__name__}: {exc}", _hint(exc))
        if os.environ.get("VIDSIM_DEBUG"):
            raise
        sys.exit(1)
    # Outside standalone mode typer returns the code of a command's `typer.Exit(code)` instead of exiting.
    sys.exit(exit_code if isinstance(exit_code, int) else 0)


def _hint(exc: Exception) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    if "operationalerror" in text and ("connect" in text or "connection" in text):
        return "is the database running and DATABASE_URL right? (`docker compose up -d postgres`)"
    if "redis" in text or "kombu" in text:
        return "is Redis running and REDIS_URL right? (`docker compose up -d redis`)"
    return "set VIDSIM_DEBUG=1 for the full traceback"


if __name__ == "__main__":
    main()
