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
    ray: Annotated[
        str | None,
        typer.Option(
            help="Each method a Ray task: 'auto' (running cluster, else local), 'local', or "
            "a cluster ADDRESS. Workers share the lower-layer state cache on a shared "
            "filesystem ($LORAFUSE_CACHE/states, default ~/.cache/lorafuse/states; library "
            "and --out must be shared too); finished methods are kept in OUT/partial and "
            "a rerun skips them."
        ),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="With --ray: only these rows ('references', 'ensembles' or a method; repeatable)."
        ),
    ] = None,
    cpus_per_method: Annotated[int, typer.Option(min=1, help="Ray: CPUs per method.")] = 1,
    gpus_per_method: Annotated[
        float | None, typer.Option(min=0, help="Ray: GPUs per method (default 1 if any).")
    ] = None,
) -> None:
    """Every method (ensembles, merges, routers, ELREA) on the test split, with costs:
    results.json, report.md/.html, methods.png, tasks.png."""
    from lorafuse.compare import run_compare
    from lorafuse.errors import LorafuseError
    from lorafuse.workspace import open_workspace

    if only and ray is None:
        raise LorafuseError("--only needs --ray (the serial compare runs every method)")
    if ray is not None:
        from lorafuse.training.distributed import import_ray

        import_ray()  # not installed: say so before loading the model
    ws = open_workspace(base_model=base_model, library=library, tasks=tasks, seed=seed)
    if ray is None:
        results = run_compare(
            ws, out, seed=seed, recent_merges=recent_merges, seed_methods=seed_methods
        )
    else:
        from lorafuse.compare_ray import run_compare_ray

        results = run_compare_ray(
            ws, out, seed=seed, recent_merges=recent_merges, seed_methods=seed_methods,
            only=only, address=ray,
            cpus_per_method=cpus_per_method, gpus_per_method=gpus_per_method,
        )  # fmt: skip
        if results["reused"]:
            typer.echo(f"reused finished methods from {out}/partial: "
                       + ", ".join(results["reused"]))  # fmt: skip
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
