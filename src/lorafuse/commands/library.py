"""``lorafuse library create | add | show``: thin commands over :mod:`lorafuse.library.create`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True,
    help="Make a library from PEFT adapter folders, add to it, and show what it holds.",
)

PickleOpt = Annotated[bool, typer.Option(help="Allow pickled .bin weights.")]


@app.command("create")
def create(
    out: Annotated[Path, typer.Argument(help="Library directory to make (must not exist).")],
    adapters: Annotated[list[Path], typer.Argument(help="PEFT adapter directories.")],
    name: Annotated[
        list[str] | None,
        typer.Option("--name", help="Expert name, once per adapter in order (default: folder)."),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task", help="Task(s) of each adapter, once per adapter in order ('a,b' for two)."
        ),
    ] = None,
    allow_pickle: PickleOpt = False,
) -> None:
    """Copy PEFT adapters into a new library and write its library.json."""
    from lorafuse.library.create import create_library, format_rows, library_rows

    manifest = create_library(out, adapters, names=name, tasks=task, allow_pickle=allow_pickle)
    typer.echo(format_rows(library_rows(out, allow_pickle=allow_pickle)))
    typer.echo(f"wrote {out} ({len(manifest.experts)} experts)")


@app.command("add")
def add(
    library: Annotated[Path, typer.Argument(help="Library directory (with library.json).")],
    adapter: Annotated[Path, typer.Argument(help="PEFT adapter directory to copy in.")],
    name: Annotated[str | None, typer.Option(help="Expert name (default: folder).")] = None,
    task: Annotated[str | None, typer.Option(help="Its task(s), 'a,b' for two.")] = None,
    allow_pickle: PickleOpt = False,
) -> None:
    """Copy one more PEFT adapter into a library."""
    from lorafuse.library.create import add_expert

    manifest = add_expert(library, adapter, name=name, tasks=task, allow_pickle=allow_pickle)
    entry = manifest.experts[-1]
    typer.echo(f"added {entry.name} -> {library / entry.path} ({len(manifest.experts)} experts)")


@app.command("show")
def show(
    library: Annotated[Path, typer.Argument(help="A library, or a folder of PEFT adapters.")],
    allow_pickle: PickleOpt = False,
) -> None:
    """A table of the experts: name, rank, alpha, targets, layers, size, tasks."""
    from lorafuse.library.create import format_rows, library_rows
    from lorafuse.library.manifest import load_manifest

    manifest = load_manifest(library)
    typer.echo(f"{library}: {len(manifest.experts)} experts on {manifest.base_model}")
    typer.echo(format_rows(library_rows(library, allow_pickle=allow_pickle)))
