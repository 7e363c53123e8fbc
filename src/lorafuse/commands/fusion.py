"""``lorafuse demo | compare | elrea``: every method on a library, and ELREA builds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafuse.commands.options import BaseOpt, SeedOpt, TasksOpt


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo_out"),
    library: Annotated[
        Path | None, typer.Option(help="Library to fuse (default: the shipped one).")
    ] = None,
    retrain: Annotated[bool, typer.Option(help="Rebuild the library from scratch.")] = False,
    base_model: BaseOpt = "embedded",
    seed: SeedOpt = 0,
) -> None:
    """The main job: fuse the default library on the built-in suite and report."""
    from lorafuse.demo import run_demo

    run_demo(out=out, library=library, retrain=retrain, base_model=base_model, seed=seed)


def compare(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("compare_out"),
    library: Annotated[
        Path | None, typer.Option(help="Library (default: the shipped one).")
    ] = None,
    base_model: BaseOpt = "embedded",
    tasks: TasksOpt = "builtin",
    seed: SeedOpt = 0,
    recent_merges: Annotated[
        bool, typer.Option(help="Add the merges since 2024 (DELLA, TSV, Iso, KnOTS, ...).")
    ] = False,
    seed_methods: Annotated[
        bool,
        typer.Option(help="Add LoRAHub, RegMean, Sens-Merging, DAM, LoraRetriever, EMR, MC-SMoE."),
    ] = False,
) -> None:
    """Every method (ensembles, merges, routers, ELREA) on the test split, with costs:
    results.json, report.md/.html, methods.png, tasks.png."""
    from lorafuse.compare import run_compare
    from lorafuse.workspace import open_workspace

    ws = open_workspace(base_model=base_model, library=library, tasks=tasks, seed=seed)
    results = run_compare(
        ws, out, seed=seed, recent_merges=recent_merges, seed_methods=seed_methods
    )
    typer.echo(results["table"])
    typer.echo(f"wrote {out}/results.json, report.md, report.html, methods.png, tasks.png")


def elrea_cmd(
    library: Annotated[
        Path | None,
        typer.Option(help="Library (default: the shipped one, built into the cache)."),
    ] = None,
    base_model: BaseOpt = "embedded",
    tasks: TasksOpt = "builtin",
    clustering: Annotated[
        str, typer.Option(help="'gradient' (ELREA), or the baselines 'random', 'embedding'.")
    ] = "gradient",
    n_clusters: int = 5,
    dim: Annotated[int, typer.Option(help="Random-projection dimension (<= 8192).")] = 1024,
    total_steps: Annotated[int, typer.Option(help="Training steps over all clusters.")] = 150,
    lr: float = 1e-3,
    seed: SeedOpt = 0,
    ray: Annotated[
        str | None,
        typer.Option(help="Gradient features sharded over Ray: 'auto', 'local' or ADDRESS."),
    ] = None,
) -> None:
    """ELREA: gradient features of the training set, BIRCH clusters, one expert per cluster
    from the multi-task adapter (resumable: rerun after an interruption)."""
    from lorafuse.elrea.pipeline import ElreaConfig, build_elrea, elrea_build_dir
    from lorafuse.workspace import open_workspace

    config = ElreaConfig(
        clustering=clustering,  # type: ignore[arg-type]
        n_clusters=n_clusters,
        dim=dim,
        total_steps=total_steps,
        lr=lr,
        seed=seed,
    )
    ws = open_workspace(base_model=base_model, library=library, tasks=tasks, seed=seed)
    out = elrea_build_dir(ws.library, clustering)  # never inside the installed package
    info = build_elrea(ws, out, config, ray=ray)
    sizes = [e["size"] for e in info["experts"]]
    typer.echo(f"ELREA ({clustering}): {len(sizes)} clusters of sizes {sizes} -> {out}")
    for note in info["notes"]:
        typer.echo(f"note: {note}")
