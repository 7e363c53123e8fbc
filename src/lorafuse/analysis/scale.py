"""Merging at scale: loss on held-in and held-out tasks against the number of experts merged.

As in "What Matters for Model Merging at Scale?" (seed 003): some tasks are held out (no
expert of theirs is ever merged); the other experts are taken in one seeded order and the
first n of them are merged, for n = 2, 4, 8, ..., all. Each merge is scored on the test
examples of the n held-in tasks (mean of per-task losses) and of the held-out tasks
(generalisation). Merges:

* ``uniform``: the exact full-rank mean of the n deltas (constant mixture weights 1/n);
* ``ties``: TIES (trim to ``density``, elect sign, disjoint mean) of the n experts;
* ``learned``: one coefficient per expert learned on the held-in tasks' validation split
  (gradient descent through the mixture core, as ``learned_global``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lorafuse.core.encode import Encoded
from lorafuse.core.mixture import ConstantMixer, FactorSet
from lorafuse.core.states import StateCache
from lorafuse.errors import LorafuseError
from lorafuse.eval.harness import model_log_probs, score_examples
from lorafuse.eval.report import save_png
from lorafuse.fusion.base import Fusion, evaluate
from lorafuse.library import LoraAdapter
from lorafuse.merging import merge
from lorafuse.merging.learned import learn_coefficients

METHODS = ("uniform", "ties", "learned")
DEFAULT_SIZES = (2, 4, 8, 16, 32)


def study_sizes(pool: int, sizes: Sequence[int] = DEFAULT_SIZES) -> list[int]:
    """The requested sizes that fit the pool, plus the whole pool."""
    return sorted({n for n in sizes if 1 <= n < pool} | {pool})


def split_experts(names: Sequence[str], held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """(held-out experts, merge order of the rest): one seeded shuffle, nested subsets."""
    if not 0 <= held_out < len(names) - 1:
        raise LorafuseError(f"scale study: cannot hold out {held_out} of {len(names)} experts")
    order = list(names)
    np.random.default_rng(seed).shuffle(order)
    return order[:held_out], order[held_out:]


def merged_fusion(
    method: str,
    experts: Sequence[LoraAdapter],
    model: torch.nn.Module,
    val: Sequence[Encoded],
    cache: StateCache,
    *,
    density: float,
    learn_steps: int,
    seed: int,
) -> Fusion:
    """One merge of ``experts`` as a fusion on the mixture core."""
    k = len(experts)
    if method == "uniform":
        return Fusion(method, "merging", list(experts), ConstantMixer(torch.full((k,), 1 / k)))
    if method == "ties":
        factors = merge(experts, "ties", progress=False, density=density, scale=1.0)
        return Fusion(method, "merging", [FactorSet("ties", factors)], ConstantMixer(torch.ones(1)))
    if method == "learned":
        coef = learn_coefficients(
            model, experts, val, cache, steps=learn_steps, seed=seed, progress=False
        ).coef
        return Fusion(method, "merging", list(experts), ConstantMixer(coef))
    raise LorafuseError(f"scale study: unknown merge {method!r} (have: {', '.join(METHODS)})")


def task_losses(losses: np.ndarray, tasks: Sequence[str], wanted: Sequence[str]) -> float:
    """Mean over ``wanted`` tasks of each task's mean example loss."""
    arr = np.asarray(tasks)
    return float(np.mean([losses[arr == t].mean() for t in wanted]))


def scale_study(
    model: torch.nn.Module,
    experts: Mapping[str, LoraAdapter],
    task_of: Mapping[str, str],
    test: Sequence[Encoded],
    test_tasks: Sequence[str],
    val: Sequence[Encoded],
    val_tasks: Sequence[str],
    cache: StateCache,
    *,
    held_out: int = 8,
    sizes: Sequence[int] = DEFAULT_SIZES,
    methods: Sequence[str] = METHODS,
    density: float = 0.2,
    learn_steps: int = 40,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Held-in and held-out test loss of each merge at each number of experts (JSON-ready)."""
    out_names, pool = split_experts(list(experts), held_out, seed)
    out_tasks = [task_of[n] for n in out_names]
    with torch.no_grad():
        base = score_examples(model_log_probs(model, cache.split), test, cache)
    result: dict = {
        "held_out_tasks": out_tasks,
        "order": pool,
        "sizes": study_sizes(len(pool), sizes),
        "methods": list(methods),
        "settings": {"density": density, "learn_steps": learn_steps, "seed": seed},
        "base": {"held_out": task_losses(base.loss, test_tasks, out_tasks)},
        "held_in": {m: [] for m in methods},
        "held_out": {m: [] for m in methods},
    }
    steps = [(n, m) for n in result["sizes"] for m in methods]
    for n, method in tqdm(steps, desc="scale study", disable=not progress):
        names = pool[:n]
        in_tasks = [task_of[e] for e in names]
        val_in = [e for e, t in zip(val, val_tasks, strict=True) if t in set(in_tasks)]
        fusion = merged_fusion(
            method,
            [experts[e] for e in names],
            model,
            val_in,
            cache,
            density=density,
            learn_steps=learn_steps,
            seed=seed,
        )
        scores = evaluate(model, fusion, test, cache)
        result["held_in"][method].append(task_losses(scores.loss, test_tasks, in_tasks))
        result["held_out"][method].append(task_losses(scores.loss, test_tasks, out_tasks))
    return result


def plot_scale(result: dict, path: str | Path, title: str = "merging at scale") -> Path:
    """Two panels (held-in, held-out tasks): test loss against the number of experts merged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, part in zip(axes, ("held_in", "held_out"), strict=True):
        for method in result["methods"]:
            ax.plot(result["sizes"], result[part][method], marker="o", label=method)
        if part == "held_out":
            ax.axhline(result["base"]["held_out"], color="grey", ls="--", label="base model")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts merged")
        ax.set_ylabel("test loss (mean over tasks)")
        ax.set_title(part.replace("_", "-") + " tasks")
        ax.legend()
    fig.suptitle(title)
    return save_png(fig, path)
