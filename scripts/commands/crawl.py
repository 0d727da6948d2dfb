"""`vidsim crawl ...`: manage crawl sources and run the pipeline's stages by hand.

Each stage runs here, in this process, with a progress bar (or, with --enqueue, as a task
for the workers). Stages hold the same locks as the scheduled runs: a stage already
running elsewhere is reported and not started twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from app.config import get_settings
from scripts.commands.common import Fail, console, db_session, stage_bars

if TYPE_CHECKING:
    from app.crawl.pipeline import StageReport

crawl_app = typer.Typer(no_args_is_help=True, help="Crawl sources, preprocessing and the training pipeline.")


def _source_ids(refs: list[str] | None) -> list[int] | None:
    if not refs:
        return None
    from app.crawl.sources import SourceError, find_source

    with db_session() as session:
        try:
            return [find_source(session, ref).id for ref in refs]
        except SourceError as exc:
            raise Fail(str(exc), "see `vidsim crawl list`") from None


def _print_counts(title: str, counts: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in counts.items():
        if value not in (None, {}, 0) or key in ("found", "fetched", "preprocessed"):
            table.add_row(
                key, ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
            )
    console.print(table)


def _run_stage(
    source: list[str] | None,
    *,
    enqueue: bool,
    task: str,
    run_here: Callable[..., StageReport],
    name: str,
    enqueued: str,
    busy: str,
) -> None:
    """Runs one pipeline stage over the given sources: as the workers.crawl_tasks ``task``
    when ``enqueue``, else here through ``run_here`` with progress bars; ``name`` titles
    its counts ("crawl run 7"), ``busy`` says that another run of it holds the lock."""
    ids = _source_ids(source)
    if enqueue:
        from workers import crawl_tasks

        getattr(crawl_tasks, task).delay(source_ids=ids, trigger="cli")
        console.print(enqueued)
        return
    with stage_bars() as bars:
        report = run_here(settings=get_settings(), source_ids=ids, progress=bars, trigger="cli")
    if report.skipped:
        raise Fail(busy, "wait for it (`vidsim crawl status`)")
    _print_counts(f"{name} run {report.run_id} ({report.seconds:.1f} s)", report.counts)


@crawl_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A unique name for the source.")],
    kind: Annotated[str, typer.Argument(help="url_list, web_page, feed, sitemap or platform.")],
    url: Annotated[
        str | None, typer.Argument(help="Start page, feed, sitemap, platform page, or a text file of URLs.")
    ] = None,
    video_url: Annotated[
        list[str] | None, typer.Option("--video-url", help="url_list: a video URL (repeatable).")
    ] = None,
    max_depth: Annotated[int | None, typer.Option(help="web_page: links followed from the start page.")] = None,
    max_pages: Annotated[int | None, typer.Option(help="web_page/sitemap: pages read per run.")] = None,
    same_host: Annotated[bool | None, typer.Option(help="web_page: stay on the start page's host.")] = None,
    follow_pages: Annotated[bool | None, typer.Option(help="sitemap: read listed pages for videos.")] = None,
    extractor: Annotated[
        list[str] | None, typer.Option(help="platform: allowed yt-dlp extractor (repeatable).")
    ] = None,
    allow_generic: Annotated[bool | None, typer.Option(help="platform: allow yt-dlp's generic extractor.")] = None,
    max_duration_s: Annotated[float | None, typer.Option(help="platform: longest video accepted.")] = None,
    max_items: Annotated[int | None, typer.Option(help="Videos fetched per run from this source.")] = None,
    trim_head_s: Annotated[float | None, typer.Option(help="Always cut this much from the start.")] = None,
    trim_tail_s: Annotated[float | None, typer.Option(help="Always cut this much from the end.")] = None,
) -> None:
    """Add a crawl source."""
    from app.crawl.sources import SourceError, add_source

    options = {
        "urls": video_url or None, "max_depth": max_depth, "max_pages": max_pages, "same_host": same_host,
        "follow_pages": follow_pages, "extractors": extractor or None, "allow_generic": allow_generic,
        "max_duration_s": max_duration_s, "max_items": max_items,
        "trim_head_s": trim_head_s, "trim_tail_s": trim_tail_s,
    }  # fmt: skip
    with db_session() as session:
        try:
            source = add_source(session, name=name, kind=kind, url=url, options=options)
        except SourceError as exc:
            raise Fail(str(exc)) from None
        console.print(f"source {source.id} {source.name} ({source.kind}) added")


@crawl_app.command("list")
def list_() -> None:
    """Sources, with their items by state."""
    from app.crawl.sources import list_sources
    from app.ops.queries import crawl_item_states

    with db_session() as session:
        per_state = crawl_item_states(session=session)
        sources = list_sources(session)
    table = Table("id", "name", "kind", "enabled", "items", "last crawled", "url")
    for s in sources:
        states = ", ".join(f"{k} {v}" for k, v in sorted(per_state.get(s.id, {}).items()))
        last = f"{s.last_crawled_at:%Y-%m-%d %H:%M}" if s.last_crawled_at else ""
        table.add_row(str(s.id), s.name, s.kind, "yes" if s.enabled else "no", states, last, s.url or "(list)")
    console.print(table)


def _set_enabled(ref: str, enabled: bool) -> None:
    from app.crawl.sources import SourceError, set_enabled

    with db_session() as session:
        try:
            source = set_enabled(session, ref, enabled)
        except SourceError as exc:
            raise Fail(str(exc), "see `vidsim crawl list`") from None
        console.print(f"source {source.id} {source.name} {'enabled' if enabled else 'disabled'}")


@crawl_app.command("disable")
def disable(source: Annotated[str, typer.Argument(help="Source id or name.")]) -> None:
    """Stop crawling a source (its items stay)."""
    _set_enabled(source, False)


@crawl_app.command("enable")
def enable(source: Annotated[str, typer.Argument(help="Source id or name.")]) -> None:
    """Crawl a disabled source again."""
    _set_enabled(source, True)


@crawl_app.command("run")
def run(
    source: Annotated[list[str] | None, typer.Option(help="Only this source (id or name; repeatable).")] = None,
    max_items: Annotated[int | None, typer.Option(help="Run budget: videos fetched.")] = None,
    max_pages: Annotated[int | None, typer.Option(help="Run budget: pages, feeds and sitemaps read.")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="Run budget: bytes received.")] = None,
    enqueue: Annotated[bool, typer.Option(help="Send it to the workers instead of running here.")] = False,
) -> None:
    """Crawl: discover the sources' videos, fetch and vet them."""
    from functools import partial

    from app.crawl import pipeline

    _run_stage(
        source, enqueue=enqueue, task="crawl_run",
        run_here=partial(pipeline.run_crawl, max_items=max_items, max_pages=max_pages, max_bytes=max_bytes),
        name="crawl", enqueued="crawl run enqueued", busy="a crawl run is already in progress",
    )  # fmt: skip


@crawl_app.command("preprocess")
def preprocess(
    source: Annotated[list[str] | None, typer.Option(help="Only this source (id or name; repeatable).")] = None,
    enqueue: Annotated[bool, typer.Option(help="Send it to the workers instead of running here.")] = False,
) -> None:
    """Preprocess: cut fixed and recurring heads and tails into clean files."""
    from app.crawl import pipeline

    _run_stage(
        source, enqueue=enqueue, task="crawl_preprocess", run_here=pipeline.run_preprocess,
        name="preprocess", enqueued="preprocessing enqueued", busy="preprocessing is already in progress",
    )  # fmt: skip


@crawl_app.command("pipeline")
def pipeline_(
    enqueue: Annotated[bool, typer.Option(help="Send the chain to the workers instead of running here.")] = False,
) -> None:
    """All stages: crawl -> preprocess -> (enough new material) train -> backfill -> index."""
    if enqueue:
        from workers.crawl_tasks import crawl_pipeline

        crawl_pipeline.delay()
        console.print("pipeline enqueued")
        return
    run()
    preprocess()
    material()


@crawl_app.command("material")
def material() -> None:
    """Check for enough new clean videos to train on; request (and start) training."""
    from app.crawl import pipeline
    from workers.crawl_tasks import crawl_check_material

    settings = get_settings()
    with db_session() as session:
        n, _ = pipeline.new_material(session)
    console.print(
        f"{n} new clean videos since the last training request (threshold {settings.crawl_train_min_new_items})"
    )
    request_id = crawl_check_material()  # here, not as a task: it enqueues training itself
    if request_id is not None:
        console.print(f"training request {request_id} recorded")


@crawl_app.command("status")
def status(runs: Annotated[int, typer.Option(help="Recent runs to show.")] = 8) -> None:
    """Items by state and reason, recent runs, training requests."""
    from app.crawl import pipeline
    from app.crawl.crawler import state_counts
    from app.ops.queries import recent_crawl_runs, recent_training_requests

    with db_session() as session:
        counts = state_counts(session)
        clean_files = len(pipeline.training_files(session))
        recent_runs = recent_crawl_runs(session=session, limit=runs)
        requests = recent_training_requests(session=session, limit=3)
    console.print("items: " + (", ".join(f"{k} {v}" for k, v in sorted(counts["states"].items())) or "none"))
    if counts["rejected"]:
        console.print("rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(counts["rejected"].items())))
    console.print(f"clean files ready for training: {clean_files}")
    table = Table("run", "stage", "status", "trigger", "started", "seconds", "counts")
    for r in recent_runs:
        seconds = f"{(r.finished_at - r.started_at).total_seconds():.1f}" if r.finished_at else ""
        brief = {
            k: v
            for k, v in (r.counts or {}).items()
            if v and k in ("found", "fetched", "duplicates", "rejected", "preprocessed", "trimmed")
        }
        table.add_row(str(r.id), r.stage, r.status, r.trigger, f"{r.started_at:%Y-%m-%d %H:%M:%S}", seconds, str(brief))
    console.print(table)
    for req in requests:
        console.print(f"training request {req.id}: {req.new_items} videos, {req.status} {req.task_id or ''}")


@crawl_app.command("items")
def items(
    state: Annotated[str | None, typer.Option(help="discovered, fetched, preprocessed, rejected or duplicate.")] = None,
    source: Annotated[str | None, typer.Option(help="Source id or name.")] = None,
    limit: int = 30,
) -> None:
    """Crawled items, newest first, with why they were refused or what was cut."""
    from app.ops.queries import crawled_items

    ids = _source_ids([source] if source else None)
    with db_session() as session:
        rows = crawled_items(session=session, state=state, source_ids=ids, limit=limit)
    table = Table("id", "source", "state", "reason / trimmed", "url")
    for i in rows:
        if i.reject_code:
            detail = f"{i.reject_code}: {i.reason}"
        elif i.trimmed:
            detail = f"head {i.trimmed.get('head_s', 0)} s, tail {i.trimmed.get('tail_s', 0)} s"
        else:
            detail = i.reason or ""
        table.add_row(str(i.id), str(i.source_id), i.state, detail, i.url)
    console.print(table)
