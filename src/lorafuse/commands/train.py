"""``lorafuse train``: a library of private experts plus a multi-task adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafuse.commands.options import BaseOpt, SeedOpt, TasksOpt


def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Library directory to write.")],
    base_model: BaseOpt = "embedded",
    tasks: TasksOpt = "builtin",
    seed: SeedOpt = 0,
    steps: Annotated[int, typer.Option(help="Steps per private expert.")] = 100,
    multitask_steps: Annotated[int, typer.Option(help="Steps of the multi-task adapter.")] = 300,
    batch_size: int = 16,
    lr: float = 3e-3,
    rank: int = 8,
    alpha: float = 16.0,
    top_layers: Annotated[int, typer.Option(help="LoRA on the last N layers (0 = all).")] = 6,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Each expert a Ray task: 'auto' (running cluster, else local), "
            "'local', or a cluster ADDRESS."
        ),
    ] = None,
    cpus_per_expert: Annotated[int, typer.Option(min=1, help="Ray: CPUs per expert.")] = 1,
    gpus_per_expert: Annotated[
        float | None, typer.Option(min=0, help="Ray: GPUs per expert (default 1 if any).")
    ] = None,
) -> None:
    """Train one private LoRA expert per task plus a multi-task adapter (resumable)."""
    from functools import partial

    from lorafuse.models import load_base_model
    from lorafuse.tasks import load_tasks
    from lorafuse.training.config import TrainConfig
    from lorafuse.training.library import train_library

    run = train_library
    if ray is not None:
        from lorafuse.training.distributed import import_ray, train_library_ray

        import_ray()  # not installed: say so before loading the model
        run = partial(
            train_library_ray, address=ray, cpus_per_expert=cpus_per_expert,
            gpus_per_expert=gpus_per_expert,
        )  # fmt: skip

    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        rank=rank,
        alpha=alpha,
        top_layers=top_layers,
        seed=seed,
    )
    base = load_base_model(base_model)
    suite = load_tasks(tasks, seed=seed)
    manifest = run(
        base,
        suite,
        out,
        config,
        multitask_steps=multitask_steps,
        extra_config={"tasks": tasks, "seed": seed, "multitask_steps": multitask_steps},
    )
    total = sum(e.metrics.get("wall_time_s", 0) for e in manifest.experts)
    typer.echo(f"library: {out} ({len(manifest.experts)} experts, {total / 60:.1f} min training)")
