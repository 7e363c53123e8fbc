"""``lorafuse demo``: the default library fused every way and compared on the built-in suite."""

from __future__ import annotations

import time
from pathlib import Path

from lorafuse.compare import run_compare
from lorafuse.eval.run import BASE_ROW, ORACLE_ROW
from lorafuse.models import load_base_model
from lorafuse.tasks import builtin_suite
from lorafuse.training.config import TrainConfig
from lorafuse.training.library import train_library
from lorafuse.workspace import DEFAULT_LIBRARY, open_workspace

__all__ = ["DEFAULT_LIBRARY", "RETRAIN", "run_demo"]

# The command that built the shipped library (see README):
#   lorafuse train --out src/lorafuse/data/default_library --seed 0 --steps 100 \
#       --multitask-steps 300
#   lorafuse elrea --clustering gradient|random|embedding   (ELREA cluster experts)
RETRAIN = {"steps": 100, "multitask_steps": 300}
HEAVY_ITEMS = 50  # test items per task (of 100) for the ensembles and ELREA


def run_demo(
    *,
    out: Path,
    library: Path | None = None,
    retrain: bool = False,
    base_model: str = "embedded",
    seed: int = 0,
) -> dict:
    """Compare every method on the (shipped or retrained) library; print and write the report."""
    out = Path(out)
    base = load_base_model(base_model)
    retrain_s = None
    if retrain:
        library = out / "library"
        t0 = time.perf_counter()
        config = TrainConfig(steps=RETRAIN["steps"], seed=seed)
        train_library(
            base,
            builtin_suite(seed=seed),
            library,
            config,
            multitask_steps=RETRAIN["multitask_steps"],
            extra_config={"tasks": "builtin", "seed": seed, **RETRAIN},
        )
        retrain_s = time.perf_counter() - t0
        print(f"retrained the library in {retrain_s / 60:.1f} min -> {library}")
    ws = open_workspace(base=base, library=library, seed=seed)
    if retrain:
        from lorafuse.elrea.pipeline import ElreaConfig, build_elrea, elrea_dir

        for clustering in ("gradient", "random", "embedding"):
            config = ElreaConfig(clustering=clustering, seed=seed)  # type: ignore[arg-type]
            build_elrea(ws, elrea_dir(ws.library, clustering), config)
    # within 15 minutes on a fresh machine: ELREA vs its random-cluster baseline only, no
    # distillation, no group-wise Twin, and the rows that run every adapter on every item
    # (ensembles, ELREA) on half the test items; `lorafuse compare` does all of it
    results = run_compare(
        ws,
        out,
        seed=seed,
        title="lorafuse demo",
        elrea_rows=["elrea", "elrea_random"],
        distil=False,
        skip=frozenset({"twin_group"}),
        heavy_items=HEAVY_ITEMS,
    )
    if retrain_s is not None:
        results["timings"]["retrain_s"] = retrain_s
    summaries = results["methods"]
    print()
    print(
        f"lorafuse demo: {len(ws.private)} private experts, {len(ws.suite.tasks)} tasks, "
        f"{len(ws.encoded('test'))} test examples, base model {base.name}"
    )
    print(results["table"])
    print(
        f"\nbase model mean exact match: {100 * summaries[BASE_ROW]['mean_accuracy']:.1f}%  "
        f"private experts on their own tasks: "
        f"{100 * summaries[ORACLE_ROW]['mean_accuracy']:.1f}%"
    )
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in results["timings"].items()))
    print(f"wrote {out}/results.json, report.md, report.html, methods.png, tasks.png")
    return results
