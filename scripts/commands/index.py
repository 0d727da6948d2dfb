"""`vidsim index ...`: build the vector index from the active model's embeddings, and inspect it."""

from __future__ import annotations

from typing import Annotated

import typer

from app.config import get_settings
from scripts.commands.common import Fail, console, db_session

index_app = typer.Typer(no_args_is_help=True, help="Build and inspect the vector index.")


@index_app.command("rebuild")
def index_rebuild(
    dtype: Annotated[
        str | None, typer.Option(help="f32, f16 or i8 storage, for this build (default: VIDSIM_INDEX_DTYPE).")
    ] = None,
) -> None:
    """Build a new index from the active model's embeddings and switch to it, with the
    build settings (VIDSIM_INDEX_*) as they are now."""
    from app.index import rebuild
    from app.learn.registry import active_model

    with db_session() as session:
        try:
            version = rebuild.rebuild_index(
                session=session, model=active_model(session=session), settings=get_settings(), dtype=dtype
            )
        except rebuild.RebuildBusy as exc:
            raise Fail(str(exc), "wait for it to finish, then run again") from None
    console.print(
        f"index version {version.id}: {version.size} videos, {version.dim}-d {version.dtype}, "
        f"{version.build_seconds:.2f}s -> {version.path}"
    )


@index_app.command("status")
def index_status() -> None:
    """The active model and index versions."""
    from app.ops import status

    with db_session() as session:
        state = status.index_status(session=session)
    model, idx = state.model, state.index
    console.print(
        f"model {model.id} {model.name} ({'trained' if model.trained else 'untrained'}, {model.dim}-d): "
        f"{state.embedded} embeddings"
    )
    if idx is None:
        console.print("no index built yet: searches are exact over the embeddings (`vidsim index rebuild`)")
    else:
        console.print(
            f"index {idx.id}: {idx.size} vectors, {idx.dtype}, built {idx.created_at:%Y-%m-%d %H:%M:%S}, "
            f"{state.newer} newer embeddings searched exactly"
        )
