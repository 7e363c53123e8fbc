"""Options shared by the ``lorafuse`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

BaseOpt = Annotated[
    str, typer.Option("--base-model", help="Local HF causal LM folder, or 'embedded'.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for splits, sampling and init.")]
MethodOpt = Annotated[
    list[str] | None, typer.Option("--method", help="Fusion method (repeatable).")
]
ParamOpt = Annotated[
    list[str] | None, typer.Option("--param", help="KEY=VALUE for the method (repeatable).")
]
OracleOpt = Annotated[
    bool, typer.Option("--oracle", help="Also score each expert on its task (oracle row).")
]
TasksOpt = Annotated[
    str,
    typer.Option(
        "--tasks",
        help="'builtin', 'bigbench48', 'bigbench:TASK,TASK' or a JSONL file of "
        "{task, prompt, answer}.",
    ),
]


LibOpt = Annotated[Path | None, typer.Option(help="Library (default: the shipped one).")]
