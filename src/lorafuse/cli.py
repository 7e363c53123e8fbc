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

from lorafuse.commands.library import app as library_app
from lorafuse.errors import LorafuseError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fuse libraries of LoRA experts: ensembling, merging and routing, measured.",
)

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


@app.command()
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


@app.command("eval")
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


def _family_command(family: str, default: str):
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
        from lorafuse.fusion import FUSION_METHODS

        names = method or [default]
        wrong = [m for m in names if m in FUSION_METHODS and FUSION_METHODS[m].family != family]
        if wrong:
            raise LorafuseError(f"{', '.join(wrong)}: not {family} methods (see lorafuse methods)")
        _fusion(names, param, base_model, library, tasks, split, seed, out, oracle)

    command.__doc__ = f"Run {family} methods on a library (default {default}); fit on val."
    return command


app.command("route")(_family_command("routing", "arrow"))
app.command("ensemble")(_family_command("ensembling", "ensemble_prob"))


@app.command()
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


@app.command()
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
) -> None:
    """Every method (ensembles, merges, routers, ELREA) on the test split, with costs:
    results.json, report.md/.html, methods.png, tasks.png."""
    from lorafuse.compare import run_compare
    from lorafuse.workspace import open_workspace

    ws = open_workspace(base_model=base_model, library=library, tasks=tasks, seed=seed)
    results = run_compare(ws, out, seed=seed, recent_merges=recent_merges)
    typer.echo(results["table"])
    typer.echo(f"wrote {out}/results.json, report.md, report.html, methods.png, tasks.png")


@app.command("merge")
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


@app.command("learn-merge")
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
        ws,
        per_layer=per_layer,
        objective=objective,  # type: ignore[arg-type]
        search=search,
        split=split,
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
    save_learned_merge(ws, learned, out, config)
    typer.echo(f"coefficients: {learned.coef.numpy().round(3).tolist()}")
    typer.echo(f"wrote {out}")


@app.command("elrea")
def elrea_cmd(
    library: Annotated[
        Path | None, typer.Option(help="Library (default: the shipped one); output goes inside.")
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
    from lorafuse.elrea.pipeline import ElreaConfig, build_elrea, elrea_dir
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
    out = elrea_dir(ws.library, clustering)
    info = build_elrea(ws, out, config, ray=ray)
    sizes = [e["size"] for e in info["experts"]]
    typer.echo(f"ELREA ({clustering}): {len(sizes)} clusters of sizes {sizes} -> {out}")
    for note in info["notes"]:
        typer.echo(f"note: {note}")


LibOpt = Annotated[Path | None, typer.Option(help="Library (default: the shipped one).")]


@app.command("connectivity")
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


@app.command("select")
def select_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("analysis"),
    how: Annotated[str, typer.Option(help="Fusion judged: 'average' or 'arrow'.")] = "average",
    per_task: Annotated[int, typer.Option(help="Validation items per task.")] = 20,
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
    result = select_command(ws, out, how=how, per_task=per_task, seed=seed)
    typer.echo(f"greedy: {result['greedy']}")
    for c, entry in result["clusters"].items():
        typer.echo(f"{c} clusters: loss {entry['loss']:.4f}  {entry['clusters']}")
    typer.echo(f"wrote {out}/selection.json, selection.png")
    if mbc:
        from lorafuse.analysis.run import mbc_command

        res = mbc_command(ws, out, clusters=mbc, seed=seed)
        typer.echo(
            f"MBC experts ({mbc} task groups): test loss {res['mean_loss']:.3f}, "
            f"accuracy {100 * res['mean_accuracy']:.1f}%  {[g['tasks'] for g in res['groups']]}"
        )


@app.command()
def methods() -> None:
    """List the merge methods (for merge configs) and the fusion methods (for --method)."""
    import inspect

    from lorafuse.fusion import FUSION_METHODS
    from lorafuse.merging import MERGE_METHODS

    typer.echo(
        "merge methods (lorafuse merge CONFIG; lorafuse eval --method merge --param method=NAME):"
    )
    for m in MERGE_METHODS.values():
        params = ", ".join(m.params.model_fields)
        typer.echo(f"  {m.name:16} {m.space:8} {m.summary}  [{params}]  {m.url}")
    typer.echo("fusion methods (lorafuse eval/route/ensemble --method NAME --param KEY=VALUE):")
    for f in FUSION_METHODS.values():
        params = [p for p in inspect.signature(f.build).parameters if p not in ("ws", "seed")]
        typer.echo(f"  {f.name:18} {f.family:10} {f.summary}  [{', '.join(params)}]")


@app.command("scale-study")
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


def main() -> None:
    # peft 0.21 calls a transformers API that transformers 5.23 deprecates; not ours to fix
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        code = app(standalone_mode=False)
    except LorafuseError as err:
        if debug:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except Exception as err:  # usage errors and the like
        # typer 0.29 vendors click (typer._click): its exceptions are not click's classes
        if callable(getattr(err, "show", None)) and isinstance(
            getattr(err, "exit_code", None), int
        ):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, typer.Abort):
            typer.echo("aborted", err=True)
            sys.exit(130)
        if type(err).__name__ == "ValidationError" and not debug:  # pydantic: a bad setting
            first = err.errors()[0]  # type: ignore[attr-defined]
            where = ".".join(str(p) for p in first.get("loc", ()))
            typer.echo(f"error: {where}: {first.get('msg')}", err=True)
            sys.exit(2)
        raise
    if isinstance(code, int) and code:  # typer returns exit codes here (130 after Ctrl-C)
        sys.exit(code)
