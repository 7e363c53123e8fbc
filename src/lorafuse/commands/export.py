"""``lorafuse export SRC OUT --for vllm|peft``: a thin command over :mod:`lorafuse.serving`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export(
    src: Annotated[Path, typer.Argument(help="PEFT adapter directory (an expert, a merge).")],
    out: Annotated[Path, typer.Argument(help="Directory to write (must not exist).")],
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
        typer.Option("--base-model", help="For --full-model (default: the adapter's base)."),
    ] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickled .bin weights.")] = False,
) -> None:
    """Export an adapter that a serving engine computes as lorafuse does."""
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
