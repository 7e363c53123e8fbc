"""``lorafuse demo``: the default library fused and measured on the built-in suite."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lorafuse.eval.harness import ExampleScores
from lorafuse.eval.report import markdown_table, plot_methods, plot_task_heatmap
from lorafuse.eval.run import (
    BASE_ROW,
    ORACLE_ROW,
    oracle,
    score_rows,
    summaries_of,
    versions,
)
from lorafuse.fusion.ensemble import fit_mixture_weights, score_ensembles, target_log_probs
from lorafuse.fusion.run import run_methods
from lorafuse.io import atomic_write_json, atomic_write_text
from lorafuse.library import save_adapter
from lorafuse.merging import merge
from lorafuse.merging.learned import learned_merge, save_learned_merge
from lorafuse.models import load_base_model
from lorafuse.tasks import builtin_suite
from lorafuse.training.config import TrainConfig
from lorafuse.training.library import MULTITASK, train_library
from lorafuse.workspace import DEFAULT_LIBRARY, Workspace, open_workspace

__all__ = ["DEFAULT_LIBRARY", "run_demo"]

# The command that built the shipped library (see README):
#   lorafuse train --out src/lorafuse/data/default_library --seed 0 --steps 100 \
#       --multitask-steps 300
RETRAIN = {"steps": 100, "multitask_steps": 300}
# Static merges of the private experts shown in the demo: row -> (method, parameters).
DEMO_MERGES: dict[str, tuple[str, dict]] = {
    "uniform_average": ("linear", {}),  # exact full-rank mean of the deltas
    "lowrank_average": ("lowrank_average", {}),  # mean of A's and of B's (cross-terms)
    "task_arithmetic": ("task_arithmetic", {"scale": 0.3}),
    "ties": ("ties", {"density": 0.2, "scale": 1.0}),
    "dare_ties": ("dare_ties", {"density": 0.5, "scale": 1.0, "seed": 0}),
}
# Merge coefficients learned on the validation split (row -> per layer?), exported exactly.
LEARNED_MERGES: dict[str, bool] = {"learned_global": False, "learned_per_layer": True}
LEARN_SETTINGS = {"steps": 40, "lr": 0.1}
# Ensembles of the private experts, all scored from one batched pass of the 8 experts.
ENSEMBLE_ROWS = ["ensemble_prob", "ensemble_logit", "ensemble_learned"]
# Routing methods (fitted on the validation split where they learn): row -> (method, params).
DEMO_ROUTERS: dict[str, tuple[str, dict]] = {
    "arrow": ("arrow", {}),
    "hc_arrow": ("hc_arrow", {}),
    "learned_router": ("learned_router", {}),
    "twin": ("twin", {}),
    "twin_group": ("twin_group", {}),
}


def demo_ensembles(ws: Workspace, encoded: list) -> dict[str, ExampleScores]:
    """Uniform mixture of probabilities, of logits, and learned mixture weights (val)."""
    experts = list(ws.private.values())
    k = len(experts)
    lp, rows = target_log_probs(ws.base.model, experts, ws.encoded("val"), ws.cache)
    learned = fit_mixture_weights(lp, rows)
    uniform = torch.full((k,), 1.0 / k)
    variants = {
        "ensemble_prob": (uniform, "prob"),
        "ensemble_logit": (uniform, "logit"),
        "ensemble_learned": (learned, "prob"),
    }
    return score_ensembles(ws.base.model, experts, encoded, ws.cache, variants)


def run_demo(
    *,
    out: Path,
    library: Path | None = None,
    retrain: bool = False,
    base_model: str = "embedded",
    seed: int = 0,
) -> dict:
    """Evaluate base, multi-task, oracle, static and learned merges; print and write the report."""
    started = time.perf_counter()
    out = Path(out)
    timings: dict[str, float] = {}
    base = load_base_model(base_model)
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
        timings["retrain_s"] = time.perf_counter() - t0
        print(f"retrained the library in {timings['retrain_s'] / 60:.1f} min -> {library}")
    ws = open_workspace(base=base, library=library, seed=seed)
    library, manifest, adapters, cache = ws.library, ws.manifest, ws.adapters, ws.cache
    private = ws.private
    suite = ws.suite

    examples = ws.examples("test")
    encoded = ws.encoded("test")
    t0 = time.perf_counter()
    cache.get(encoded, desc="test states (once, shared by all methods)")
    timings["state_cache_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    merged_dirs = {}
    for row, (method, params) in DEMO_MERGES.items():
        factors = merge(list(private.values()), method, progress=False, **params)
        merged_dirs[row] = save_adapter(
            out / "merged" / row,
            factors,
            base_model=base.name,
            readme=f"lorafuse demo merge of the private experts: {method} {params}\n",
        )
    timings["merging_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for row, per_layer in LEARNED_MERGES.items():
        config = {"per_layer": per_layer, "split": "val", "seed": seed, **LEARN_SETTINGS}
        learned = learned_merge(ws, per_layer=per_layer, seed=seed, **LEARN_SETTINGS)
        merged_dirs[row] = save_learned_merge(ws, learned, out / "merged" / row, config)
    timings["learned_merges_s"] = time.perf_counter() - t0
    tasks_of = {e.name: e.tasks for e in manifest.experts}
    subsets = {n: [i for i, ex in enumerate(examples) if ex.task in tasks_of[n]] for n in private}
    t0 = time.perf_counter()
    rows = score_rows(
        base,
        encoded,
        cache,
        {
            **{n: adapters[n].path for n in private},
            MULTITASK: adapters[MULTITASK].path,
            **merged_dirs,
        },
        subsets=subsets,
    )
    timings["evaluation_s"] = time.perf_counter() - t0
    rows[ORACLE_ROW] = oracle(examples, rows, ws.expert_of)

    t0 = time.perf_counter()
    rows.update(demo_ensembles(ws, encoded))
    timings["ensembles_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    routed, info = run_methods(ws, DEMO_ROUTERS, "test", seed=seed)
    rows.update(routed)
    timings["routing_s"] = time.perf_counter() - t0
    order = [
        BASE_ROW,
        MULTITASK,
        ORACLE_ROW,
        *ENSEMBLE_ROWS,
        *DEMO_MERGES,
        *LEARNED_MERGES,
        *DEMO_ROUTERS,
    ]
    summaries = summaries_of(examples, {k: rows[k] for k in order}, reference=rows[ORACLE_ROW])
    for row, extra in info.items():
        summaries[row]["info"] = extra
    timings["total_s"] = time.perf_counter() - started

    table = markdown_table(summaries)
    print()
    print(
        f"lorafuse demo: {len(private)} private experts, {len(suite.tasks)} tasks, "
        f"{len(examples)} test examples, base model {base.name}"
    )
    print(table)
    print(
        f"\nbase model mean exact match: {100 * summaries[BASE_ROW]['mean_accuracy']:.1f}%  "
        f"private experts on their own tasks: "
        f"{100 * summaries[ORACLE_ROW]['mean_accuracy']:.1f}%"
    )
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))

    results = {
        "methods": summaries,
        "seed": seed,
        "library": str(library),
        "timings": timings,
        "config": {
            "base_model": base.name,
            "tasks": "builtin",
            "split": "test",
            "library_config": manifest.config,
        },
        "versions": versions(),
    }
    atomic_write_json(out / "results.json", results)
    plot_methods(summaries, out / "methods.png", title="lorafuse demo (test split)")
    plot_task_heatmap(summaries, out / "tasks.png")
    atomic_write_text(out / "report.md", _report(table, timings, library))
    print(f"wrote {out}/results.json, report.md, methods.png, tasks.png")
    return results


def _report(table: str, timings: dict[str, float], library: Path) -> str:
    lines = [
        "# lorafuse demo report",
        "",
        f"Library: `{library}`. Loss = mean answer-token NLL (answer + end-of-turn); "
        "acc = greedy exact match (%); norm = accuracy / own expert's accuracy.",
        "",
        table,
        "",
        "![methods](methods.png)",
        "",
        "![tasks](tasks.png)",
        "",
        "Timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()),
        "",
    ]
    return "\n".join(lines)
