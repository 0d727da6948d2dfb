"""``vidsim demo``: the whole product on one machine with no servers.

Real footage -> library -> Celery worker (embedded broker) embeds it -> index -> events
published like a chat app would -> signed callbacks received on a local HTTP server ->
a results page with thumbnails."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _configure(data_dir: Path | None) -> Path:
    """Demo settings go into the environment so the worker process sees them too."""
    if data_dir is not None:
        os.environ["VIDSIM_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("VIDSIM_CALLBACK_ALLOW_PRIVATE", "true")  # the receiver is local
    os.environ.setdefault("VIDSIM_OUTBOX_SWEEP_INTERVAL_S", "1")
    from app.config import get_settings

    get_settings.cache_clear()
    root = get_settings().data_dir.resolve()
    os.environ.setdefault("VIDSIM_MEDIA_ROOTS", str(root / "demo"))
    get_settings.cache_clear()
    return root


def _train_demo_model(library: list[Path], *, steps: int, settings, console: Console):
    """Pre-trains a small encoder (Barlow Twins, cpu-small preset) on the demo library and
    makes it the serving model (nothing is indexed yet, so it takes over at once) when it
    passes the rollout gate (app.learn.gate); returns the model that serves."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.learn import gate, registry, rollout
    from app.learn.train.config import TrainConfig
    from app.models import ModelVersion

    # Named after the preset's whole config: a run interrupted earlier resumes, while a
    # data folder kept from a release with another preset starts a new run.
    config = TrainConfig.preset("cpu-small", steps=steps)
    digest = hashlib.sha256(repr(config).encode()).hexdigest()[:8]
    name = f"demo-cpu-small-{steps}-{digest}"
    with session_scope() as session:  # trained by an earlier demo, and not serving: the gate refused it
        model_id = session.scalar(select(ModelVersion.id).where(ModelVersion.name == name))
    if model_id is None:
        console.print(f"training an encoder without labels on the demo library (Barlow Twins, {steps} steps)...")
        model_id = rollout.train_model(preset="cpu-small", videos=library, settings=settings, name=name,
                                       overrides={"steps": steps}, resume=True, progress=True)  # fmt: skip
    with session_scope() as session:
        trained = session.get_one(ModelVersion, model_id)
        console.print(f"model {trained.id} {trained.name} trained: loss curve "
                      f"{settings.checkpoint_dir.resolve() / trained.name / 'loss.png'}")  # fmt: skip
        with console.status("rollout gate: scoring it against the serving model on edited copies of the library..."):
            verdict = gate.check(session=session, model_id=model_id, settings=settings)
        if verdict is not None:
            console.print(f"rollout gate: {verdict.summary()}")
            refusal = verdict.refusal()
            if refusal:
                console.print(f"[yellow]{refusal}[/yellow]")
                return registry.active_model(session=session)
        return registry.activate(session=session, model_id=model_id)


def run_demo(*, data_dir: Path | None, max_queries: int, console: Console, train_steps: int = 60) -> None:
    root = _configure(data_dir)
    from sqlalchemy import func, select

    from app.config import get_settings
    from app.db import migrate, session_scope
    from app.evaluate.corpus import build_demo_corpus
    from app.index.rebuild import rebuild_index
    from app.learn.registry import active_model
    from app.media.register import register
    from app.models import Embedding, Video
    from app.ops.report import write_results_page
    from app.serve.recommend import videos_to_embed
    from scripts.receiver import CallbackReceiver
    from workers.process import running_worker
    from workers.publish import publish_video_selected
    from workers.tasks import embed_video

    settings = get_settings()
    demo_dir = root / "demo"
    started = time.perf_counter()
    backend = (
        "embedded: SQLite + filesystem broker"
        if settings.embedded
        else "Redis + " + settings.sqlalchemy_url.split("@")[-1]
    )
    console.print(f"[bold]vidsim demo[/bold] in {root} ({backend})")
    migrate()

    with console.status("cutting the demo library from real footage..."):
        corpus = build_demo_corpus(demo_dir, progress=lambda msg: console.log(msg))
    console.print(
        f"library: {len(corpus.library)} clips from real footage; queries: {len(corpus.queries)} edited copies"
    )

    path_to_id: dict[Path, int] = {}
    with session_scope() as session:
        for path in corpus.library:
            path_to_id[path] = register(session, str(path), settings=settings).video_id
        model = active_model(session=session)
    if not model.trained and train_steps > 0:
        model = _train_demo_model(corpus.library, steps=train_steps, settings=settings, console=console)
    elif not model.trained:
        console.print(
            f"[yellow]note:[/yellow] serving the untrained encoder {model.name} (deterministic initialisation)"
        )
    else:
        console.print(f"serving trained model {model.id} {model.name}")
    with session_scope() as session:
        todo = videos_to_embed(session=session)

    with running_worker(demo_dir / "worker.log"):
        for video_id in todo:
            embed_video.delay(video_id)
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        with progress:
            task = progress.add_task("worker embedding the library", total=len(path_to_id))
            while True:
                with session_scope() as session:
                    done = (
                        session.scalar(
                            select(func.count())
                            .select_from(Embedding)
                            .join(Video)
                            .where(Video.in_library, Embedding.model_version_id == model.id)
                        )
                        or 0
                    )
                    failed = session.scalar(select(func.count()).where(Video.in_library, Video.status == "failed")) or 0
                progress.update(task, completed=done + failed)
                if done + failed >= len(path_to_id):
                    break
                time.sleep(0.5)
        with session_scope() as session:
            version = rebuild_index(session=session, model=active_model(session=session), settings=settings)
        console.print(f"index version {version.id}: {version.size} videos, {version.dim}-d {version.dtype}")

        queries = corpus.queries[:max_queries]
        bad = demo_dir / "queries" / "not-a-video.mp4"
        bad.write_bytes(b"this is text, not a video\n" * 10)
        run = time.strftime("%H%M%S")
        expected: dict[str, int] = {}
        notes: dict[str, str] = {}
        with CallbackReceiver(settings.webhook_secrets[0]) as receiver:
            for i, q in enumerate(queries):
                event_id = f"demo-{run}-{i}-{q.edit}"
                publish_video_selected(event_id=event_id, video_uri=str(q.path), callback_url=receiver.url, k=5)
                expected[event_id] = path_to_id[q.source]
                notes[event_id] = (
                    f"an edited copy ({q.edit.replace('_', ' ')}) "
                    f"of library video {path_to_id[q.source]} ({q.source.name})"
                )
            first_id = path_to_id[corpus.library[0]]
            known = f"demo-{run}-library-{first_id}"
            publish_video_selected(event_id=known, video_id=first_id, callback_url=receiver.url, k=5)
            notes[known] = f"library video {first_id} itself (already embedded: served from its stored vector)"
            broken = f"demo-{run}-broken"
            publish_video_selected(event_id=broken, video_uri=str(bad), callback_url=receiver.url)
            notes[broken] = "a text file named .mp4 (shows a readable error, and the worker carries on)"
            wanted = {*expected, known, broken}
            with console.status(f"waiting for {len(wanted)} signed callbacks..."):
                got = receiver.wait_for(wanted, timeout_s=600)

    table = Table("event", "query", "top results (video id: calibrated score)", "source at", "where (query = source)")
    hits = 0
    for event_id in [*expected, known, broken]:
        item = got.get(event_id)
        if item is None:
            table.add_row(event_id, "", "[red]no callback[/red]", "")
            continue
        body = item.payload
        query = (body.get("query") or {}).get("uri", "")
        if body.get("error"):
            table.add_row(event_id, Path(query).name, f"[red]{body['error']}[/red]", "")
            continue
        ranks = {r["video_id"]: r["rank"] for r in body["results"]}
        want = expected.get(event_id)
        rank = ranks.get(want) if want else None
        hits += rank == 1
        top = ", ".join(f"{r['video_id']}: {r['calibrated']:.3f}" for r in body["results"])
        first = body["results"][0] if body["results"] else {}
        where = ""
        if first.get("query_start_s") is not None:
            where = (f"{first['query_start_s']:.0f}-{first['query_end_s']:.0f} s = "
                     f"{first['start_s']:.0f}-{first['end_s']:.0f} s of {first['video_id']}")  # fmt: skip
        found = "-" if want is None else (f"#{rank}" if rank else "[red]missed[/red]")
        table.add_row(event_id, Path(query).name, top, found, where)
    console.print(table)
    console.print(
        f"edited copies found at rank 1: {hits}/{len(expected)}; "
        f"callbacks received and verified: {len(got)}/{len(wanted)}"
    )

    with console.status("drawing the results page..."), session_scope() as session:
        page = write_results_page(
            demo_dir / "report", session=session, settings=settings, event_ids=[*expected, known, broken],
            expected=expected, notes=notes, title="vidsim demo: query frames and recommended videos",
        )  # fmt: skip
    console.print(f"results page: [bold]{page}[/bold]  ({time.perf_counter() - started:.0f}s in all)")
