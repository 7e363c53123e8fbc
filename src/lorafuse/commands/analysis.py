"""``lorafuse connectivity | select | scale-study``: analyses of a library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafuse.commands.options import BaseOpt, LibOpt, SeedOpt, TasksOpt


def connectivity_cmd(
    a: Annotated[str, typer.Option("--a", help="First expert (name in the library).")],
    b: Annotated[str, typer.Option("--b", help="Second expert.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("analysis"),
    grid: Annotated[int, typer.Option(help="Number of α values in [0, 1].")] = 11,
    split: str = "test",
    library: LibOpt = None,
    base_model: BaseOpt = "embedded",
    tasks: TasksOpt = "builtin",
    seed: SeedOpt = 0,
) -> None:
    """Loss along the interpolation of two experts (deltas and factors), with the oracle."""
    from lorafuse.analysis.run import connectivity_command
    from lorafuse.workspace import open_workspace

    ws = open_workspace(base_model=base_model, library=library, tasks=tasks, seed=seed)
    result = connectivity_command(ws, a, b, out, grid=grid, split=split)
    for path, groups in result["curves"].items():
        for group, ys in groups.items():
            typer.echo(f"{path:8} {group:16} " + " ".join(f"{y:.3f}" for y in ys))
    typer.echo(f"oracle: {result['oracle']}")
    typer.echo(f"wrote {out}/connectivity.json, connectivity.png")


def select_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("analysis"),
    how: Annotated[str, typer.Option(help="Fusion judged: 'average' or 'arrow'.")] = "average",
    per_task: Annotated[int, typer.Option(help="Validation items per task.")] = 20,
    max_kept: Annotated[
        int | None, typer.Option(help="Budget: stop greedy forward after N experts.")
    ] = None,
    mbc: Annotated[
        int, typer.Option(help="Also retrain one expert per N task groups (MBC); 0 = off.")
    ] = 0,
    library: LibOpt = None,
    base_model: BaseOpt = "embedded",
    tasks: TasksOpt = "builtin",
    seed: SeedOpt = 0,
) -> None:
    """Expert selection: greedy forward and hierarchical clusters, quality vs experts kept."""
    from lorafuse.analysis.run import select_command
    from lorafuse.workspace import open_workspace

    ws = open_workspace(base_model=base_model, library=library, tasks=tasks, seed=seed)
    if mbc:
        ws.require_tasks("MBC (one expert per task group)")
    result = select_command(ws, out, how=how, per_task=per_task, seed=seed, max_kept=max_kept)
    typer.echo(f"greedy: {result['greedy']}")
    for c, entry in result["clusters"].items():
        typer.echo(f"{c} clusters: loss {entry['loss']:.4f}  {entry['clusters']}")
    for c, entry in result["mc_smoe"].items():
        typer.echo(f"{c} MC-SMoE groups: loss {entry['loss']:.4f}  {entry['groups']}")
    typer.echo(f"wrote {out}/selection.json, selection.png")
    if mbc:
        from lorafuse.analysis.run import mbc_command

        res = mbc_command(ws, out, clusters=mbc, seed=seed)
        typer.echo(
            f"MBC experts ({mbc} task groups): test loss {res['mean_loss']:.3f}, "
            f"accuracy {100 * res['mean_accuracy']:.1f}%  {[g['tasks'] for g in res['groups']]}"
        )


def scale_study_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("analysis"),
    held_out: Annotated[int, typer.Option(help="Tasks held out (no expert merged).")] = 8,
    per_task: Annotated[int, typer.Option(help="Test and val items per task.")] = 20,
    learn_steps: Annotated[int, typer.Option(help="Steps of the learned merge.")] = 40,
    library: LibOpt = None,
    base_model: BaseOpt = "embedded",
    tasks: TasksOpt = "builtin",
    seed: SeedOpt = 0,
) -> None:
    """Merging at scale: uniform / TIES / learned merges of 2, 4, ..., all experts, loss on
    held-in and held-out tasks (scale.json, scale.png)."""
    from lorafuse.analysis.run import scale_study_command
    from lorafuse.workspace import open_workspace

    ws = open_workspace(base_model=base_model, library=library, tasks=tasks, seed=seed)
    res = scale_study_command(
        ws, out, held_out=held_out, per_task=per_task, learn_steps=learn_steps, seed=seed
    )
    for part in ("held_in", "held_out"):
        for method, ys in res[part].items():
            pts = " ".join(f"{n}:{y:.3f}" for n, y in zip(res["sizes"], ys, strict=True))
            typer.echo(f"{part:8} {method:8} {pts}")
    typer.echo(f"wrote {out}/scale.json, scale.png")
