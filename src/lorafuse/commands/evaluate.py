"""``lorafuse eval | route | ensemble | methods``: scores of adapters and fusion methods."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafuse.commands.options import BaseOpt, MethodOpt, OracleOpt, ParamOpt, SeedOpt, TasksOpt


def eval_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="results.json to write.")],
    base_model: BaseOpt = "embedded",
    adapter: Annotated[Path | None, typer.Option(help="One PEFT adapter directory.")] = None,
    library: Annotated[
        Path | None, typer.Option(help="A lorafuse library, or a folder of PEFT adapters.")
    ] = None,
    tasks: TasksOpt = "builtin",
    split: Annotated[
        str, typer.Option(help="train, val, test, or all (every line of the file, unsplit).")
    ] = "test",
    seed: SeedOpt = 0,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickled .bin weights.")] = False,
    method: MethodOpt = None,
    param: ParamOpt = None,
    oracle: OracleOpt = False,
) -> None:
    """Score the base model, one adapter, every expert of a library, or fusion methods
    (``--method``, see ``lorafuse methods``) on tasks."""
    if method:
        _fusion(method, param, base_model, library, tasks, split, seed, out, oracle)
        return
    from lorafuse.eval.run import evaluate_command

    results = evaluate_command(
        base_model=base_model,
        adapter=adapter,
        library=library,
        tasks=tasks,
        split=split,
        seed=seed,
        out=out,
        allow_pickle=allow_pickle,
    )
    typer.echo(results["table"])
    for note in results["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {out}")


def _fusion(
    methods: list[str],
    params: list[str] | None,
    base_model: str,
    library: Path | None,
    tasks: str,
    split: str,
    seed: int,
    out: Path,
    with_oracle: bool,
) -> None:
    from lorafuse.fusion.run import fusion_command, parse_params
    from lorafuse.methods import METHODS  # noqa: F401  (registers every method by name)

    results = fusion_command(
        methods=methods,
        params=parse_params(params or []),
        base_model=base_model,
        library=library,
        tasks=tasks,
        split=split,
        seed=seed,
        out=out,
        with_oracle=with_oracle,
    )
    typer.echo(results["table"])
    for note in results["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {out}")


def family_command(family: str, default: str):
    """``lorafuse route`` / ``ensemble``: the fusion command limited to one family."""

    def command(
        out: Annotated[Path, typer.Option("--out", "-o", help="results.json to write.")],
        method: MethodOpt = None,
        param: ParamOpt = None,
        library: Annotated[
            Path | None, typer.Option(help="Library (default: the shipped one).")
        ] = None,
        base_model: BaseOpt = "embedded",
        tasks: TasksOpt = "builtin",
        split: Annotated[str, typer.Option(help="Split to score (fitting uses val).")] = "test",
        seed: SeedOpt = 0,
        oracle: OracleOpt = False,
    ) -> None:
        from lorafuse.errors import LorafuseError
        from lorafuse.methods import METHODS

        names = method or [default]
        wrong = [m for m in names if m in METHODS and METHODS[m].family != family]
        if wrong:
            raise LorafuseError(f"{', '.join(wrong)}: not {family} methods (see lorafuse methods)")
        _fusion(names, param, base_model, library, tasks, split, seed, out, oracle)

    command.__doc__ = f"Run {family} methods on a library (default {default}); fit on val."
    return command


def methods() -> None:
    """List the merge methods (for merge configs) and the fusion methods (for --method)."""
    from lorafuse.merging import MERGE_METHODS
    from lorafuse.methods import METHODS

    typer.echo(
        "merge methods (lorafuse merge CONFIG; lorafuse eval --method merge --param method=NAME):"
    )
    for m in MERGE_METHODS.values():
        params = ", ".join(m.params.model_fields)
        typer.echo(f"  {m.name:16} {m.space:8} {m.summary}  [{params}]  {m.url}")
    typer.echo("fusion methods (lorafuse eval/route/ensemble --method NAME --param KEY=VALUE):")
    for f in METHODS.values():
        typer.echo(f"  {f.name:18} {f.family:10} {f.summary}  [{', '.join(f.params)}]")
