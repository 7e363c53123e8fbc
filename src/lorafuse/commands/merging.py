"""``lorafuse merge | learn-merge``: static merges from a config, learned merges."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafuse.commands.options import BaseOpt, SeedOpt, TasksOpt


def merge_cmd(
    config: Annotated[Path, typer.Argument(help="YAML merge config.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    full_model: Annotated[
        bool, typer.Option(help="Write a merged Hugging Face model instead of an adapter.")
    ] = False,
    seed: Annotated[
        int | None, typer.Option(help="Overrides parameters.seed (DARE, randomized SVD).")
    ] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickled .bin weights.")] = False,
) -> None:
    """Merge experts as a YAML config says; writes a PEFT adapter (or a full model)."""
    from lorafuse.merging import get_method
    from lorafuse.merging.config import load_merge_config
    from lorafuse.merging.run import run_merge

    cfg, root = load_merge_config(config)
    if seed is not None and "seed" in get_method(cfg.method).params.model_fields:
        cfg.parameters["seed"] = seed
    run_merge(cfg, out, root=root, full_model=full_model, allow_pickle=allow_pickle)
    typer.echo(f"wrote {out}")


def learn_merge_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter directory to write.")],
    library: Annotated[
        Path | None, typer.Option(help="Library (default: the shipped one).")
    ] = None,
    base_model: BaseOpt = "embedded",
    tasks: TasksOpt = "builtin",
    split: Annotated[str, typer.Option(help="Split the coefficients are fitted on.")] = "val",
    per_layer: Annotated[bool, typer.Option(help="One coefficient per expert per layer.")] = False,
    objective: Annotated[
        str, typer.Option(help="'loss' (answer tokens) or 'entropy' (no labels, AdaMerging).")
    ] = "loss",
    search: Annotated[
        bool, typer.Option(help="LoRAHub: gradient-free search (Powell), loss + L1.")
    ] = False,
    steps: int = 40,
    lr: float = 0.1,
    seed: SeedOpt = 0,
) -> None:
    """Learn merge coefficients of the private experts on validation data; save the merge."""
    from lorafuse.errors import LorafuseError
    from lorafuse.merging.learned import learned_merge, save_learned_merge
    from lorafuse.workspace import open_workspace

    if objective not in ("loss", "entropy"):
        raise LorafuseError(f"--objective must be 'loss' or 'entropy', got {objective!r}")
    ws = open_workspace(base_model=base_model, library=library, tasks=tasks, seed=seed)
    learned = learned_merge(
        ws.base.model,
        list(ws.private.values()),
        ws.encoded(split),
        ws.cache,
        per_layer=per_layer,
        objective=objective,  # type: ignore[arg-type]
        search=search,
        steps=steps,
        lr=lr,
        seed=seed,
    )
    config = {
        "per_layer": per_layer,
        "objective": objective,
        "search": search,
        "split": split,
        "steps": steps,
        "lr": lr,
        "seed": seed,
    }
    save_learned_merge(learned, ws.private, out, config, base_model=ws.base.name)
    typer.echo(f"coefficients: {learned.coef.numpy().round(3).tolist()}")
    typer.echo(f"wrote {out}")
