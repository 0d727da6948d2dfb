"""`vidsim library ...` and `vidsim backfill`: register the videos to recommend, and embed them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from app.config import get_settings
from scripts.commands.common import Fail, console, db_session, err, track

library_app = typer.Typer(no_args_is_help=True, help="Register and manage library videos.")


@library_app.command("add")
def library_add(
    sources: Annotated[list[str], typer.Argument(help="Files, globs, folders or http(s) URLs.")],
    collection: Annotated[str | None, typer.Option(help="Collection (tenant) to file them under.")] = None,
) -> None:
    """Register videos in the library (the same content is registered once)."""
    from app.media.register import SourceError, expand_sources, register

    settings = get_settings()
    try:
        items = list(expand_sources(sources))
    except SourceError as exc:
        raise Fail(str(exc), "check the path or glob") from None
    added = failed = 0
    for item in track(items, description="registering", hide_below=3):
        try:
            with db_session() as session:
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
    from app.ops.queries import recent_videos

    with db_session() as session:
        videos = recent_videos(session=session, limit=limit)
    table = Table("id", "status", "library", "enabled", "duration", "uri", "error")
    for v in videos:
        table.add_row(
            str(v.id), v.status, str(v.in_library), str(v.enabled),
            f"{v.duration_s:.1f}s" if v.duration_s else "", v.uri, v.error or "",
        )  # fmt: skip
    console.print(table)


@library_app.command("disable")
def library_disable(video_id: int) -> None:
    """Stop recommending a video (it stays recorded)."""
    from app.ops.queries import disable_video

    with db_session() as session:
        if disable_video(session=session, video_id=video_id) is None:
            raise Fail(f"unknown video id {video_id}", "see `vidsim library list`")
    console.print(f"video {video_id} disabled")


def backfill(
    limit: Annotated[int | None, typer.Option(help="At most this many videos.")] = None,
    inline: Annotated[bool, typer.Option(help="Embed here instead of enqueueing tasks.")] = False,
) -> None:
    """Embed every library video that the active model has not embedded yet."""
    from app.serve import recommend

    settings = get_settings()
    with db_session() as session:
        ids = recommend.videos_to_embed(session=session, limit=limit)
    if not inline:
        from workers.tasks import embed_video

        for video_id in ids:
            embed_video.delay(video_id)
        console.print(f"enqueued {len(ids)} embedding tasks on the 'embed' queue")
        return
    from app.db import session_scope  # migrated above

    failed = 0
    for video_id in track(ids, description="embedding"):
        result = recommend.embed_video(video_id, sessions=session_scope, settings=settings)
        if not result.ok:
            failed += 1
            err.print(f"[red]video {video_id}[/red]: {result.error}")
    console.print(f"embedded {len(ids) - failed} videos, {failed} failed")
