"""``lorafuse export SRC OUT --for vllm|peft`` (an adapter) and
``lorafuse export --library L --method M OUT`` (a router bundle): thin commands over
:mod:`lorafuse.serving`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafuse.commands.options import ParamOpt, SeedOpt


def export(
    src: Annotated[
        Path | None,
        typer.Argument(help="PEFT adapter directory (an expert, a merge); with --method: OUT."),
    ] = None,
    out: Annotated[Path | None, typer.Argument(help="Directory to write (must not exist).")] = None,
    target: Annotated[
        str, typer.Option("--for", help="'vllm' (one allowed rank, alpha = r) or 'peft'.")
    ] = "vllm",
    rank: Annotated[
        int | None,
        typer.Option(
            help="vllm: one of 8, 16, 32, 64, 128, 256, 320, 512 (default: the smallest "
            "holding every module); peft: at most this rank. Truncation is reported."
        ),
    ] = None,
    full_model: Annotated[
        bool, typer.Option(help="Write the base model with the deltas merged in instead.")
    ] = False,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            help="For --full-model (default: the adapter's base); with --method: the base "
            "model (default: embedded).",
        ),
    ] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickled .bin weights.")] = False,
    method: Annotated[
        str | None,
        typer.Option(
            help="Write a router bundle of a request-level router: twin, learned_router, "
            "elrea or arrow_top1 (the adapters vLLM serves + the router + load_router)."
        ),
    ] = None,
    library: Annotated[
        Path | None, typer.Option(help="With --method: the library (default: the shipped one).")
    ] = None,
    tasks: Annotated[
        str, typer.Option(help="With --method: tasks the router learns from ('builtin', JSONL).")
    ] = "builtin",
    params: ParamOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Export an adapter (or, with --method, a router bundle) that a serving engine computes
    as lorafuse does."""
    from lorafuse.errors import LorafuseError

    if method is not None:
        from lorafuse.fusion.run import parse_params
        from lorafuse.serving.bundle import export_bundle, refuse_unservable
        from lorafuse.workspace import open_workspace

        dest = out or src
        if dest is None or (out is not None and src is not None):
            raise LorafuseError("with --method give exactly one positional argument: OUT")
        parsed = parse_params(params or [])
        refuse_unservable(method, parsed)  # before loading anything
        ws = open_workspace(
            base_model=base_model or "embedded", library=library, tasks=tasks, seed=seed
        )
        export_bundle(ws, method, dest, params=parsed, rank=rank, seed=seed, report=typer.echo)
        return
    if src is None or out is None:
        raise LorafuseError("export needs SRC and OUT (or --method M OUT for a router bundle)")
    from lorafuse.serving.export import export_adapter

    export_adapter(
        src,
        out,
        target=target,  # type: ignore[arg-type]
        rank=rank,
        full_model=full_model,
        base_model=base_model,
        allow_pickle=allow_pickle,
        report=typer.echo,
    )
