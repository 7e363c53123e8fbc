"""The analysis commands on a workspace: ``lorafuse connectivity`` and ``lorafuse select``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lorafuse.analysis.connectivity import connectivity, plot_connectivity
from lorafuse.analysis.selection import (
    cluster_counts,
    cluster_selection,
    greedy_forward,
    plot_selection,
)
from lorafuse.errors import LorafuseError
from lorafuse.eval.run import versions
from lorafuse.fusion.base import evaluate
from lorafuse.io import atomic_write_json
from lorafuse.library.manifest import tasks_unknown
from lorafuse.workspace import Workspace


def connectivity_command(
    ws: Workspace, a: str, b: str, out: Path, *, grid: int = 11, split: str = "test"
) -> dict:
    """Interpolate private experts ``a`` and ``b``; losses per task, plot and JSON."""
    for name in (a, b):
        if name not in ws.adapters:
            raise LorafuseError(
                f"no expert {name!r} in {ws.library} (have: {', '.join(ws.adapters)})"
            )
    tasks_of = ws.tasks_of
    if unknown := [n for n in (a, b) if not tasks_of[n]]:
        raise LorafuseError(tasks_unknown("connectivity (curves per task)", ws.library, unknown))
    examples = ws.examples(split)
    idx = [i for i, ex in enumerate(examples) if ex.task in {*tasks_of[a], *tasks_of[b]}]
    if not idx:
        raise LorafuseError(f"no {split} examples of the tasks of {a} and {b}")
    encoded = [ws.encoded(split)[i] for i in idx]
    local = [examples[i].task for i in idx]
    groups = {t: [j for j, task in enumerate(local) if task == t] for t in dict.fromkeys(local)}
    groups["both"] = list(range(len(idx)))
    alphas = np.linspace(0.0, 1.0, grid).tolist()
    paths = ("delta", "factors")
    same_rank = set(ws.adapters[a].module_names) == set(ws.adapters[b].module_names) and all(
        ws.adapters[a].module_rank(m) == ws.adapters[b].module_rank(m)
        for m in ws.adapters[a].module_names
    )
    t0 = time.perf_counter()
    curves = connectivity(
        ws.base.model,
        ws.adapters[a],
        ws.adapters[b],
        encoded,
        groups,
        ws.cache,
        alphas=alphas,
        paths=paths if same_rank else ("delta",),
    )
    # oracle: each input to its own task's expert
    own = {
        n: evaluate(ws.base.model, _fuse_one(ws.adapters[n]), encoded, ws.cache).loss
        for n in (a, b)
    }
    owner = {t: n for n in (a, b) for t in tasks_of[n]}
    oracle_loss = np.array([own[owner[t]][j] for j, t in enumerate(local)])
    oracle = {g: float(oracle_loss[ix].mean()) for g, ix in groups.items()}
    plot = plot_connectivity(alphas, curves, oracle, out / "connectivity.png", f"{a} ↔ {b}")
    result = {
        "a": a,
        "b": b,
        "split": split,
        "alphas": alphas,
        "curves": curves,
        "oracle": oracle,
        "seconds": round(time.perf_counter() - t0, 1),
        "plot": str(plot),
        "versions": versions(),
    }
    atomic_write_json(out / "connectivity.json", result)
    return result


def select_command(
    ws: Workspace,
    out: Path,
    *,
    how: str = "average",
    per_task: int | None = 20,
    seed: int = 0,
    max_kept: int | None = None,
) -> dict:
    """Greedy forward and cluster selection of the private experts, judged on validation.

    Budget (greedy costs about K evaluations per expert kept): ``max_kept`` stops greedy
    forward after that many experts; cluster counts follow ``cluster_counts(K)``."""
    idx = ws.per_task("val", per_task)
    encoded = [ws.encoded("val")[i] for i in idx]
    names = list(ws.private)
    experts = list(ws.private.values())
    t0 = time.perf_counter()
    greedy = greedy_forward(ws.base.model, experts, encoded, ws.cache, how=how, k=max_kept)
    counts = cluster_counts(len(experts))
    clusters = cluster_selection(ws.base.model, experts, encoded, ws.cache, how=how, counts=counts)
    curves = {
        f"greedy forward ({how})": {i + 1: loss for i, loss in enumerate(greedy.losses)},
        f"hierarchical clusters ({how})": {c: loss for c, (_, loss) in clusters.items()},
    }
    mc_smoe = _mc_smoe_curve(ws, encoded, how, per_task, counts)
    if mc_smoe:
        curves[f"MC-SMoE groups ({how})"] = {c: loss for c, (_, loss) in mc_smoe.items()}
    plot = plot_selection(curves, out / "selection.png", f"expert selection ({len(idx)} val items)")
    result = {
        "how": how,
        "n_val": len(idx),
        "budget": {"max_kept": max_kept, "cluster_counts": counts},
        "greedy": {"kept": [names[i] for i in greedy.kept], "losses": greedy.losses},
        "clusters": {
            str(c): {"clusters": [[names[i] for i in g] for g in groups], "loss": loss}
            for c, (groups, loss) in clusters.items()
        },
        "mc_smoe": {
            str(c): {"groups": [[names[i] for i in g] for g in groups], "loss": loss}
            for c, (groups, loss) in mc_smoe.items()
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "seed": seed,
        "plot": str(plot),
        "versions": versions(),
    }
    atomic_write_json(out / "selection.json", result)
    return result


def _mc_smoe_curve(
    ws: Workspace, encoded, how: str, per_task: int | None, counts: list[int]
) -> dict:
    """MC-SMoE libraries of 1..K experts from the retriever's routing statistics (needs each
    expert's task, for its prototype); empty when the tasks are unknown."""
    from lorafuse.analysis.selection import mc_smoe_selection
    from lorafuse.fusion.seed_routing import retriever_routing

    if ws.untasked:
        return {}
    routing = retriever_routing(ws, per_task or 20)
    experts = list(ws.private.values())
    return mc_smoe_selection(
        ws.base.model, experts, routing, encoded, ws.cache, how=how, counts=counts
    )


def mbc_command(
    ws: Workspace, out: Path, *, clusters: int = 4, steps: int = 150, seed: int = 0
) -> dict:
    """MBC experts: cluster the private experts' deltas into task groups, retrain one LoRA per
    group on the union of its tasks' training data (resumable: finished experts are kept),
    and score each test input with its task group's expert (the oracle over groups)."""
    from lorafuse.fusion.hc import cluster_experts
    from lorafuse.library import LoraAdapter
    from lorafuse.training.config import TrainConfig
    from lorafuse.training.train import top_layers_at, train_adapter

    ws.require_tasks("MBC (one expert per task group)")
    names = list(ws.private)
    tasks_of = ws.tasks_of
    groups = cluster_experts(list(ws.private.values()), clusters)
    train_examples = ws.examples("train")
    test_examples, test_encoded = ws.examples("test"), ws.encoded("test")
    loss = np.full(len(test_encoded), np.nan)
    correct = np.zeros(len(test_encoded), dtype=bool)
    t0 = time.perf_counter()
    result_groups = []
    for g, members in enumerate(groups):
        tasks = {t for i in members for t in tasks_of[names[i]]}
        path = out / "mbc" / f"group{g}"
        if not (path / "adapter_model.safetensors").is_file():
            train = [
                ws.encoded("train")[i] for i, ex in enumerate(train_examples) if ex.task in tasks
            ]
            top = top_layers_at(ws.base.model, ws.cache.split)
            config = TrainConfig(steps=steps, seed=seed + g, top_layers=top)
            train_adapter(ws.base, train, ws.cache, config, path, desc=f"mbc group {g}")
        idx = [i for i, ex in enumerate(test_examples) if ex.task in tasks]
        scores = evaluate(
            ws.base.model,
            _fuse_one(LoraAdapter.open(path)),
            [test_encoded[i] for i in idx],
            ws.cache,
        )
        loss[idx], correct[idx] = scores.loss, scores.correct
        result_groups.append(
            {
                "experts": [names[i] for i in members],
                "tasks": sorted(tasks),
                "loss": float(scores.loss.mean()),
                "accuracy": float(scores.correct.mean()),
            }
        )
    result = {
        "clusters": clusters,
        "groups": result_groups,
        "mean_loss": float(np.nanmean(loss)),
        "mean_accuracy": float(correct.mean()),
        "seconds": round(time.perf_counter() - t0, 1),
        "seed": seed,
        "versions": versions(),
    }
    atomic_write_json(out / "mbc.json", result)
    return result


def _fuse_one(adapter):
    from lorafuse.analysis.selection import fuse

    return fuse([adapter], "average")


def scale_study_command(
    ws: Workspace,
    out: Path,
    *,
    held_out: int = 8,
    per_task: int | None = 20,
    learn_steps: int = 40,
    seed: int = 0,
) -> dict:
    """``lorafuse scale-study``: merges of 2, 4, ..., all private experts; JSON + PNG."""
    from lorafuse.analysis.scale import plot_scale, scale_study

    task_of = {name: tasks[0] for name, tasks in ws.tasks_of.items() if name in ws.private}
    if len(task_of) < len(ws.private) or not task_of:
        raise LorafuseError(f"{ws.library}: the scale study needs each private expert's task")
    test_idx, val_idx = ws.per_task("test", per_task), ws.per_task("val", per_task)
    t0 = time.perf_counter()
    result = scale_study(
        ws.base.model,
        ws.private,
        task_of,
        [ws.encoded("test")[i] for i in test_idx],
        [ws.examples("test")[i].task for i in test_idx],
        [ws.encoded("val")[i] for i in val_idx],
        [ws.examples("val")[i].task for i in val_idx],
        ws.cache,
        held_out=held_out,
        learn_steps=learn_steps,
        seed=seed,
    )
    result.update(
        seconds=time.perf_counter() - t0,
        config={"library": str(ws.library), "per_task": per_task, "held_out": held_out},
        versions=versions(),
    )
    atomic_write_json(out / "scale.json", result)
    plot_scale(result, out / "scale.png", title=f"merging at scale ({len(ws.private)} experts)")
    return result
