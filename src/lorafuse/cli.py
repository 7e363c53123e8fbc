"""The ``lorafuse`` command line: thin commands over the public functions.

Every user mistake is a :class:`LorafuseError`, printed as one line with exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from lorafuse.commands import analysis, evaluate, fusion, merging, train
from lorafuse.commands.export import export as export_command
from lorafuse.commands.library import app as library_app
from lorafuse.failures import one_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fuse libraries of LoRA experts: ensembling, merging and routing, measured.",
)

# Commands live in lorafuse.commands; registered here, in the order ``--help`` lists them.
app.command()(train.train)
app.command("eval")(evaluate.eval_cmd)
app.command("route")(evaluate.family_command("routing", "arrow"))
app.command("ensemble")(evaluate.family_command("ensembling", "ensemble_prob"))
app.command()(fusion.demo)
app.command()(fusion.compare)
app.command("merge")(merging.merge_cmd)
app.command("learn-merge")(merging.learn_merge_cmd)
app.command("elrea")(fusion.elrea_cmd)
app.command("connectivity")(analysis.connectivity_cmd)
app.command("select")(analysis.select_cmd)
app.command()(evaluate.methods)
app.command("scale-study")(analysis.scale_study_cmd)


@app.callback()
def _global(
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="Torch device of every command: auto (CUDA when present, else CPU), cpu, "
            "cuda, cuda:N (also $LORAFUSE_DEVICE).",
        ),
    ] = None,
    bigbench_dir: Annotated[
        Path | None,
        typer.Option(
            "--bigbench-dir",
            help="A BIG-bench checkout (or sdist) for --tasks bigbench48 / bigbench:TASK,...; "
            "default: the bigbench==1.0.0 sdist, fetched once with pip into the cache.",
        ),
    ] = None,
) -> None:
    """Fuse libraries of LoRA experts: ensembling, merging and routing, measured."""
    if device is not None:
        import os

        from lorafuse.device import DEVICE_ENV, resolve_device

        os.environ[DEVICE_ENV] = str(resolve_device(device))  # read by load_base_model
    if bigbench_dir is not None:
        import os

        from lorafuse.tasks.bigbench import SOURCE_ENV

        os.environ[SOURCE_ENV] = str(bigbench_dir)


app.add_typer(library_app, name="library")
app.command("export")(export_command)


def main() -> None:
    # peft 0.21 calls a transformers API that transformers 5.23 deprecates; not ours to fix
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        code = app(standalone_mode=False)
    except Exception as err:
        if isinstance(err, typer.Abort):
            typer.echo("aborted", err=True)
            sys.exit(130)
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `lorafuse CMD`: its help
            err.show()  # type: ignore[attr-defined]
            sys.exit(err.exit_code)  # type: ignore[attr-defined]
        failure = None if debug and not hasattr(err, "exit_code") else one_line(err)
        if failure is None:
            raise
        typer.echo(failure[0], err=True)
        sys.exit(failure[1])
    if isinstance(code, int) and code:  # typer returns exit codes here (130 after Ctrl-C)
        sys.exit(code)
