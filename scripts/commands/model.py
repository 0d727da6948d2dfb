"""`vidsim train`, `vidsim finetune` and `vidsim model ...`: make model versions and roll them out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from app.config import get_settings
from scripts.commands.common import Fail, console, counting_bar, db_session

model_app = typer.Typer(no_args_is_help=True, help="Model versions: list, activate.")


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
        import time

        from app.db import migrate
        from workers.train_tasks import train as start_run

        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = name or rollout.run_name(preset=preset, init_model_id=init_model_id, suffix=stamp)
        migrate()  # cheap when current
        try:
            # Here, not as a message: the run is recorded at once (`vidsim status` and
            # `--stop` know it before any worker is free); its chunks go to the workers.
            start_run(preset=preset, videos=[str(f) for f in files] if files else None, overrides=overrides,
                      name=name, init_model_id=init_model_id, epochs=epochs, activate=activate)  # fmt: skip
        except ValueError as exc:
            raise Fail(str(exc), "vidsim library add PATH... or vidsim train --videos PATH...") from None
        console.print(
            f"training run {name} queued: workers on the 'train' queue train it in chunks "
            f"(`vidsim status` shows its progress, `vidsim train --stop {name}` stops it)"
        )
        return
    with db_session() as session:  # the schema must exist before training registers its result
        if name is not None:
            from app.learn.runs import find_run

            if find_run(session=session, name=name) is not None:  # its folder is the workers' to write
                fix = f"vidsim train --name {name} --queue continues it"
                raise Fail(f"{name} is a training run of the workers", fix)
        if files is None:
            files = rollout.library_files(session=session) if init_model_id else rollout.training_files(session=session)
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
    queue: Annotated[
        bool, typer.Option(help="Train on the 'train' queue's workers, in resumable chunks (see `vidsim status`).")
    ] = False,
    stop: Annotated[
        str | None, typer.Option("--stop", metavar="NAME", help="Stop the queued training run NAME (resumable).")
    ] = None,
) -> None:
    """Pre-train an encoder with Barlow Twins and register it as a model version."""
    if stop is not None:
        _stop(stop)
        return
    _train_command(preset=preset, videos=videos, name=name, steps=steps, lambd=lambd, init_model_id=None,
                   epochs=None, activate=activate, queue=queue)  # fmt: skip


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

        with db_session() as session:
            model_id = active_model(session=session).id
    _train_command(preset=preset, videos=videos, name=name, steps=None, lambd=None, init_model_id=model_id,
                   epochs=epochs, activate=activate, queue=queue)  # fmt: skip


def _stop(name: str) -> None:
    from app.learn import runs

    with db_session() as session:
        try:
            run = runs.stop_run(session=session, name=name)
        except LookupError as exc:
            raise Fail(str(exc), "`vidsim status` lists the training runs") from None
    resume = f"`vidsim train --name {name} --queue` continues it"
    if run.state == runs.STOPPED:
        console.print(f"training run {name} stopped at step {run.step}/{run.total_steps or '?'}; {resume}")
    elif run.state == runs.STOPPING:
        console.print(f"training run {name} stopping: its running chunk ends after its current step; {resume}")
    else:
        console.print(f"training run {name} already {run.state} (step {run.step}/{run.total_steps or '?'})")


def _activate(model_id: int, *, inline: bool, force: bool = False) -> None:
    from app.learn import gate, rollout
    from app.media.video import VideoError

    if not force:
        settings = get_settings()
        scoring = "rollout gate: scoring both models on edited copies of the library..."
        try:
            with console.status(scoring) as status, db_session() as session:
                verdict = gate.check(session=session, model_id=model_id, settings=settings,
                                     progress=lambda msg: status.update(f"rollout gate: {msg}..."))  # fmt: skip
        except VideoError as exc:
            fix = f"fix or disable that library video, or `vidsim model activate {model_id} --force`"
            raise Fail(f"the rollout gate could not score model {model_id}: {exc.reason}", fix) from None
        if verdict is not None:
            console.print(f"rollout gate: {verdict.summary()}")
            refusal = verdict.refusal()
            if refusal:
                raise Fail(f"model {model_id}: {refusal}", f"vidsim model activate {model_id} --force serves it anyway")
    if not inline:
        from workers.tasks import activate_model

        activate_model.delay(model_id)
        console.print(
            f"model {model_id} warming up: workers embed the library with it; it serves once its index is built"
        )
        return
    with counting_bar(f"embedding the library with model {model_id}") as progress:
        index_id = rollout.roll_out_here(model_id, settings=get_settings(), progress=progress)
    console.print(f"model {model_id} now serves, with index version {index_id}")


@model_app.command("activate")
def model_activate(
    model_id: int,
    inline: Annotated[bool, typer.Option(help="Embed and index here instead of through workers.")] = False,
    force: Annotated[bool, typer.Option(help="Skip the rollout gate.")] = False,
) -> None:
    """Roll a model version out: the library is embedded with it and an index built; the
    current model serves until then. The rollout gate first scores it against the active
    model on edited copies of the library, and refuses it when it is worse."""
    from app.models import ModelVersion

    with db_session() as session:
        if session.get(ModelVersion, model_id) is None:
            raise Fail(f"unknown model version {model_id}", "see `vidsim model list`")
    _activate(model_id, inline=inline, force=force)


@model_app.command("list")
def model_list() -> None:
    """Model versions, their state and metrics."""
    from app.ops.queries import model_versions

    with db_session() as session:
        models = model_versions(session=session)
    table = Table("id", "name", "status", "trained", "dim", "data", "metrics", "created")
    for m in models:
        data = ", ".join(f"{k} {v}" for k, v in m.data_summary.items() if k in ("videos", "clips", "steps"))
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in m.metrics.items() if isinstance(v, int | float))
        table.add_row(
            str(m.id), m.name, m.status, str(m.trained), str(m.dim), data, metrics, f"{m.created_at:%Y-%m-%d %H:%M}"
        )
    console.print(table)
