"""The ``vidsim`` command: everything an operator does, one verb each."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.config import get_settings
from scripts.crawl_cli import crawl_app
from workers.process import ALL_QUEUES, CELERY

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
library_app = typer.Typer(no_args_is_help=True, help="Register and manage library videos.")
index_app = typer.Typer(no_args_is_help=True, help="Build and inspect the vector index.")
deliveries_app = typer.Typer(no_args_is_help=True, help="Inspect and replay callback deliveries.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures.")
model_app = typer.Typer(no_args_is_help=True, help="Model versions: list, activate.")
app.add_typer(library_app, name="library")
app.add_typer(index_app, name="index")
app.add_typer(deliveries_app, name="deliveries")
app.add_typer(db_app, name="db")
app.add_typer(bench_app, name="bench")
app.add_typer(model_app, name="model")
app.add_typer(crawl_app, name="crawl")

console = Console()
err = Console(stderr=True)


class Fail(Exception):
    """A readable failure: message, then how to fix it."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


def _session():  # type: ignore[no-untyped-def]
    from app.db import migrate, session_scope

    migrate()  # cheap when current; a fresh embedded install needs its schema
    return session_scope()


@app.command()
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


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION."""
    from app.db import migrate

    migrate(revision)
    console.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ('base' for an empty database)."""
    from app.db import downgrade

    downgrade(revision)
    console.print(f"database at {revision}")


@library_app.command("add")
def library_add(
    sources: Annotated[list[str], typer.Argument(help="Files, globs, folders or http(s) URLs.")],
    collection: Annotated[str | None, typer.Option(help="Collection (tenant) to file them under.")] = None,
) -> None:
    """Register videos in the library (the same content is registered once)."""
    from rich.progress import track

    from app.media.register import SourceError, expand_sources, register

    settings = get_settings()
    try:
        items = list(expand_sources(sources))
    except SourceError as exc:
        raise Fail(str(exc), "check the path or glob") from None
    added = failed = 0
    for item in track(items, description="registering", console=err, disable=len(items) < 3):
        try:
            with _session() as session:
                got = register(session, item, settings=settings, collection=collection)
        except SourceError as exc:
            err.print(f"[red]skipped[/red] {exc}")
            failed += 1
            continue
        label = "added" if got.created else "known"
        if got.status == "failed":
            label, failed = "[red]failed[/red]", failed + 1
        else:
            added += got.created
        console.print(f"{label} {got.video_id} {got.uri}" + (f" ({got.error})" if got.error else ""))
    console.print(f"{added} added, {len(items) - added - failed} already known, {failed} failed")


@library_app.command("list")
def library_list(limit: int = 50) -> None:
    """The most recently registered videos with their status."""
    from sqlalchemy import select

    from app.models import Video

    with _session() as session:
        rows = session.scalars(select(Video).order_by(Video.id.desc()).limit(limit)).all()
        table = Table("id", "status", "library", "enabled", "duration", "uri", "error")
        for v in rows:
            table.add_row(
                str(v.id), v.status, str(v.in_library), str(v.enabled),
                f"{v.duration_s:.1f}s" if v.duration_s else "", v.uri, v.error or "",
            )  # fmt: skip
    console.print(table)


@library_app.command("disable")
def library_disable(video_id: int) -> None:
    """Stop recommending a video (it stays recorded)."""
    from app.models import Video

    with _session() as session:
        video = session.get(Video, video_id)
        if video is None:
            raise Fail(f"unknown video id {video_id}", "see `vidsim library list`")
        video.enabled = False
    console.print(f"video {video_id} disabled")


@app.command()
def backfill(
    limit: Annotated[int | None, typer.Option(help="At most this many videos.")] = None,
    inline: Annotated[bool, typer.Option(help="Embed here instead of enqueueing tasks.")] = False,
) -> None:
    """Embed every library video that the active model has not embedded yet."""
    from app.serve import recommend

    settings = get_settings()
    with _session() as session:
        ids = recommend.videos_to_embed(session, limit=limit)
    if not inline:
        from workers.tasks import embed_video

        for video_id in ids:
            embed_video.delay(video_id)
        console.print(f"enqueued {len(ids)} embedding tasks on the 'embed' queue")
        return
    from rich.progress import track

    failed = 0
    for video_id in track(ids, description="embedding", console=err):
        with _session() as session:
            result = recommend.embed_video(session, video_id, settings=settings)
        if not result.ok:
            failed += 1
            err.print(f"[red]video {video_id}[/red]: {result.error}")
    console.print(f"embedded {len(ids) - failed} videos, {failed} failed")


@index_app.command("rebuild")
def index_rebuild(dtype: Annotated[str, typer.Option(help="f32, f16 or i8 storage.")] = "f16") -> None:
    """Build a new index from the active model's embeddings and switch to it."""
    from app.index import search
    from app.learn.registry import active_model

    with _session() as session:
        try:
            version = search.rebuild_index(session, active_model(session), settings=get_settings(), dtype=dtype)
        except search.RebuildBusy as exc:
            raise Fail(str(exc), "wait for it to finish, then run again") from None
        console.print(
            f"index version {version.id}: {version.size} videos, {version.dim}-d {version.dtype}, "
            f"{version.build_seconds:.2f}s -> {version.path}"
        )


@index_app.command("status")
def index_status() -> None:
    """The active model and index versions."""
    from sqlalchemy import func, select

    from app.learn.registry import active_model
    from app.models import Embedding, IndexVersion

    with _session() as session:
        model = active_model(session)
        embedded = session.scalar(select(func.count()).where(Embedding.model_version_id == model.id))
        idx = session.scalar(select(IndexVersion).where(IndexVersion.is_active))
        console.print(
            f"model {model.id} {model.name} ({'trained' if model.trained else 'untrained'}, {model.dim}-d): "
            f"{embedded} embeddings"
        )
        if idx is None:
            console.print("no index built yet: searches are exact over the embeddings (`vidsim index rebuild`)")
        else:
            console.print(
                f"index {idx.id}: {idx.size} vectors, {idx.dtype}, built {idx.created_at:%Y-%m-%d %H:%M:%S}, "
                f"{embedded - idx.size} newer embeddings searched exactly"
            )


def _train_command(
    *,
    preset: str,
    videos: list[str] | None,
    name: str | None,
    steps: int | None,
    lambd: float | None,
    init_model_id: int | None,
    epochs: int | None,
    activate: bool,
    queue: bool,
) -> None:
    from app.learn import rollout
    from app.media.register import expand_sources

    overrides = {k: v for k, v in {"steps": steps, "lambd": lambd}.items() if v is not None}
    files = [Path(p) for p in expand_sources(videos)] if videos else None
    if queue:
        from workers.train_tasks import train as train_task

        train_task.delay(preset=preset, videos=[str(f) for f in files] if files else None, overrides=overrides,
                         name=name, init_model_id=init_model_id, epochs=epochs, activate=activate)  # fmt: skip
        console.print("training enqueued on the 'train' queue")
        return
    with _session():
        pass  # the schema must exist before training registers its result
    if files is None:
        files = rollout.library_files() if init_model_id else rollout.training_files()
    settings = get_settings()
    try:
        model_id = rollout.train_model(
            preset=preset, videos=files, settings=settings, name=name, overrides=overrides,
            resume=name is not None, init_model_id=init_model_id, epochs=epochs, progress=True,
        )  # fmt: skip
    except ValueError as exc:
        raise Fail(str(exc), "vidsim library add PATH... or vidsim train --videos PATH...") from None
    console.print(f"model version {model_id} registered (`vidsim model activate {model_id}` to serve it)")
    if activate:
        _activate(model_id, inline=settings.embedded)


@app.command()
def train(
    videos: Annotated[
        list[str] | None,
        typer.Option("--videos", help="Files, folders or globs (default: crawled files, else the library)."),
    ] = None,
    preset: Annotated[
        str, typer.Option(help="cpu-small (minutes on a CPU) or full (the specification, GPUs).")
    ] = "cpu-small",
    name: Annotated[str | None, typer.Option(help="Run name; an existing run of that name is resumed.")] = None,
    steps: Annotated[int | None, typer.Option(help="Override the preset's step budget.")] = None,
    lambd: Annotated[
        float | None, typer.Option(help="Barlow Twins off-diagonal weight (spec 0.001, paper 0.0051).")
    ] = None,
    activate: Annotated[bool, typer.Option(help="Roll the new version out when trained.")] = False,
    queue: Annotated[bool, typer.Option(help="Run as a Celery task on the 'train' queue.")] = False,
) -> None:
    """Pre-train an encoder with Barlow Twins and register it as a model version."""
    _train_command(preset=preset, videos=videos, name=name, steps=steps, lambd=lambd, init_model_id=None,
                   epochs=None, activate=activate, queue=queue)  # fmt: skip


@app.command()
def finetune(
    model_id: Annotated[
        int | None, typer.Option("--from", help="Model version to start from (default: the active one).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the library (5-10).")] = 5,
    videos: Annotated[list[str] | None, typer.Option("--videos", help="Default: the library's files.")] = None,
    preset: Annotated[str, typer.Option(help="Preset for batch size, frames and augmentation.")] = "cpu-small",
    name: Annotated[str | None, typer.Option(help="Run name; an existing run of that name is resumed.")] = None,
    activate: Annotated[bool, typer.Option(help="Roll the new version out when trained.")] = False,
    queue: Annotated[bool, typer.Option(help="Run as a Celery task on the 'train' queue.")] = False,
) -> None:
    """Fine-tune a trained model on the company's library."""
    if model_id is None:
        from app.learn.registry import active_model

        with _session() as session:
            model_id = active_model(session).id
    _train_command(preset=preset, videos=videos, name=name, steps=None, lambd=None, init_model_id=model_id,
                   epochs=epochs, activate=activate, queue=queue)  # fmt: skip


def _activate(model_id: int, *, inline: bool) -> None:
    from app.learn import rollout

    if not inline:
        from workers.tasks import activate_model

        activate_model.delay(model_id)
        console.print(
            f"model {model_id} warming up: workers embed the library with it; it serves once its index is built"
        )
        return
    from rich.progress import Progress

    with Progress(console=err) as progress:
        task = progress.add_task(f"embedding the library with model {model_id}", total=None)
        index_id = rollout.roll_out_here(
            model_id,
            settings=get_settings(),
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    console.print(f"model {model_id} now serves, with index version {index_id}")


@model_app.command("activate")
def model_activate(
    model_id: int,
    inline: Annotated[bool, typer.Option(help="Embed and index here instead of through workers.")] = False,
) -> None:
    """Roll a model version out: the library is embedded with it and an index built; the
    current model serves until then."""
    from app.models import ModelVersion

    with _session() as session:
        if session.get(ModelVersion, model_id) is None:
            raise Fail(f"unknown model version {model_id}", "see `vidsim model list`")
    _activate(model_id, inline=inline)


@model_app.command("list")
def model_list() -> None:
    """Model versions, their state and metrics."""
    from sqlalchemy import select

    from app.models import ModelVersion

    with _session() as session:
        table = Table("id", "name", "status", "trained", "dim", "data", "metrics", "created")
        for m in session.scalars(select(ModelVersion).order_by(ModelVersion.id)):
            data = ", ".join(f"{k} {v}" for k, v in m.data_summary.items() if k in ("videos", "clips", "steps"))
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in m.metrics.items() if isinstance(v, int | float))
            table.add_row(
                str(m.id), m.name, m.status, str(m.trained), str(m.dim), data, metrics, f"{m.created_at:%Y-%m-%d %H:%M}"
            )
    console.print(table)


@app.command()
def publish(
    video: Annotated[str, typer.Option(help="A library video id, or a video URI/path.")],
    callback_url: Annotated[str, typer.Option(help="Where vidsim POSTs the answer.")],
    event_id: Annotated[str | None, typer.Option(help="Idempotency key (default: random).")] = None,
    k: Annotated[int | None, typer.Option(help="How many videos to recommend.")] = None,
    collection: Annotated[str | None, typer.Option(help="Recommend only from this collection.")] = None,
) -> None:
    """Publish a video-selected event, as the chat app does."""
    from workers.publish import publish_video_selected

    target = {"video_id": int(video)} if video.isdigit() else {"video_uri": video}
    sent = publish_video_selected(callback_url=callback_url, event_id=event_id, k=k, collection=collection, **target)
    console.print(f"published event {sent}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    queues: Annotated[str, typer.Option(help="Comma-separated queues.")] = ALL_QUEUES,
    concurrency: Annotated[int | None, typer.Option(help="Worker processes (default: CPU count).")] = None,
    pool: Annotated[str | None, typer.Option(help="prefork, solo or threads (GPU workers: solo).")] = None,
    beat: Annotated[bool, typer.Option(help="Also run the periodic scheduler (one per deployment).")] = False,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
) -> None:
    """Start a Celery worker (extra options go to `celery worker`)."""
    import shutil
    import uuid

    from app.db import migrate

    migrate()
    port = metrics_port or get_settings().metrics_port
    if port:
        # Prefork children write their metrics here; the main process serves the sum.
        folder = get_settings().data_dir.resolve() / "metrics" / uuid.uuid4().hex[:8]
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        os.environ.update(PROMETHEUS_MULTIPROC_DIR=str(folder), VIDSIM_METRICS_PORT=str(port))
    args = [*CELERY, "worker", "-Q", queues]
    args += ["--loglevel", get_settings().log_level]
    if concurrency:
        args += ["--concurrency", str(concurrency)]
    if pool:
        args += ["--pool", pool]
    if beat:
        args += ["--beat"]
    os.execv(sys.executable, [*args, *ctx.args])


@app.command()
def beat() -> None:
    """Start the periodic scheduler (the outbox sweeper). Run exactly one."""
    args = [*CELERY, "beat", "--loglevel", get_settings().log_level]
    os.execv(sys.executable, args)


@app.command()
def status() -> None:
    """Queues, workers, active model and index, pending deliveries, recent failures."""
    from app.ops.status import overview

    with _session() as session:
        o = overview(session)
    console.print(
        f"model: {o.model or 'none'}{'' if o.model_trained else ' (untrained)'}; "
        f"{o.embedded}/{o.library} library videos embedded"
    )
    if o.warming:
        console.print(f"warming up (embedding the library, then switching): {', '.join(o.warming)}")
    console.print(f"index: {o.index or 'none (exact search)'}; {o.index_lag} newer embeddings searched exactly")
    console.print("events, last hour: " + (", ".join(f"{k} {v}" for k, v in o.events_last_hour.items()) or "none"))
    console.print("deliveries: " + (", ".join(f"{k} {v}" for k, v in o.deliveries.items()) or "none"))
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


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    limit: Annotated[int, typer.Option(help="Events shown.")] = 30,
) -> None:
    """Serve the read-only results page: recent events, query frames, recommendations."""
    from app.ops.webui import serve

    console.print(f"results page on http://{host}:{port}/ (Ctrl-C to stop)")
    serve(host=host, port=port, limit=limit, settings=get_settings())


@deliveries_app.command("list")
def deliveries_list(
    status: Annotated[str | None, typer.Option(help="pending, delivered, dead or disabled.")] = None,
    limit: int = 30,
) -> None:
    """Recent callback deliveries and their state."""
    from sqlalchemy import select

    from app.models import Delivery, Recommendation

    with _session() as session:
        stmt = select(Delivery, Recommendation.event_id).join(Recommendation).order_by(Delivery.id.desc()).limit(limit)
        if status:
            stmt = stmt.where(Delivery.status == status)
        table = Table("id", "event", "status", "attempts", "last", "next attempt", "url")
        for d, event_id in session.execute(stmt).all():
            table.add_row(
                str(d.id), event_id, d.status, str(d.attempts),
                d.last_error or str(d.last_status_code or ""),
                f"{d.next_attempt_at:%H:%M:%S}" if d.next_attempt_at else "", d.url,
            )  # fmt: skip
    console.print(table)


@deliveries_app.command("replay")
def deliveries_replay(delivery_id: int) -> None:
    """Send a delivery again now (same webhook id, so receivers can deduplicate)."""
    from sqlalchemy.exc import NoResultFound

    from app.deliver import outbox
    from workers.tasks import deliver_callback

    with _session() as session:
        try:
            outbox.replay(delivery_id, session=session)
        except NoResultFound:
            raise Fail(f"unknown delivery id {delivery_id}", "see `vidsim deliveries list`") from None
    deliver_callback.delay(delivery_id)
    console.print(f"delivery {delivery_id} queued again")


@bench_app.command("latency")
def bench_latency(
    events: Annotated[int, typer.Option(help="Warm events to publish.")] = 500,
    cold: Annotated[int, typer.Option(help="Cold (never seen) 60-s videos to publish.")] = 5,
) -> None:
    """Event -> callback latency, warm and cold, beside decode-only time."""
    from scripts.bench_latency import main as bench_main

    bench_main(events=events, cold=cold, console=console)


@bench_app.command("retrieval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_retrieval(ctx: typer.Context) -> None:
    """Copy-detection benchmark: the trained encoder against baselines on the same data
    (options: see `python -m scripts.bench_retrieval --help`)."""
    from scripts.bench_retrieval import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


@bench_app.command("index", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_index(ctx: typer.Context) -> None:
    """Index benchmark at scale: recall, latency, memory per storage mode
    (options: see `python -m scripts.bench_index --help`)."""
    from scripts.bench_index import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)) or 0)


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("VIDSIM_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        app(standalone_mode=False)
    except Fail as exc:
        err.print(f"[red]error:[/red] {exc}" + (f"\n  fix: {exc.fix}" if exc.fix else ""))
        sys.exit(1)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # the last line of defence: one readable line, not a traceback
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
        hint = _hint(exc)
        if hint:
            err.print(f"  fix: {hint}")
        if os.environ.get("VIDSIM_DEBUG"):
            raise
        sys.exit(1)


def _hint(exc: Exception) -> str | None:
    text = f"{type(exc).__name__} {exc}".lower()
    if "operationalerror" in text and ("connect" in text or "connection" in text):
        return "is the database running and DATABASE_URL right? (`docker compose up -d postgres`)"
    if "redis" in text or "kombu" in text:
        return "is Redis running and REDIS_URL right? (`docker compose up -d redis`)"
    return "set VIDSIM_DEBUG=1 for the full traceback"


if __name__ == "__main__":
    main()
