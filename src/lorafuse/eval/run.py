"""Evaluate the base model, adapters, a library (each expert, the oracle) on one split."""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lorafuse import __version__
from lorafuse.core.encode import Encoded, encode_examples
from lorafuse.core.forward import num_layers
from lorafuse.core.mixture import layer_index
from lorafuse.core.peft_adapters import peft_adapters, peft_names
from lorafuse.core.states import StateCache
from lorafuse.eval.harness import ExampleScores, model_log_probs, per_task, score_examples
from lorafuse.eval.report import markdown_table
from lorafuse.io import atomic_write_json
from lorafuse.library import LoraAdapter, check_compatible, check_weights, open_library
from lorafuse.library.manifest import tasks_unknown, untasked
from lorafuse.models import BaseModel, load_base_model
from lorafuse.tasks import load_tasks
from lorafuse.tasks.example import ALL, Example

DEFAULT_TOP_LAYERS = 6
BASE_ROW = "base"
ORACLE_ROW = "oracle"


def adapted_from(adapters: Sequence[LoraAdapter]) -> int | None:
    """Lowest layer index any adapter touches (None if no module names a layer)."""
    layers = [layer_index(name) for a in adapters for name in a.module_names]
    layers = [layer for layer in layers if layer >= 0]
    return min(layers) if layers else None


def choose_split(base: BaseModel, adapters: Sequence[LoraAdapter]) -> int:
    """Cache states below the lowest adapted layer (the default library's split otherwise)."""
    lowest = adapted_from(adapters)
    default = max(0, num_layers(base.model) - DEFAULT_TOP_LAYERS)
    return default if lowest is None else lowest


def score_adapters(
    base: BaseModel,
    encoded: Sequence[Encoded],
    cache: StateCache,
    adapters: Mapping[str, str | Path],
    subsets: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, tuple[ExampleScores, float]]:
    """Each PEFT adapter scored (on ``subsets[name]`` only, if given): scores and seconds."""
    out: dict[str, tuple[ExampleScores, float]] = {}
    if not adapters:
        return out
    internal = peft_names(adapters)
    with peft_adapters(base, adapters) as model:
        for name in tqdm(adapters, desc="score adapters", unit="adapter"):
            model.set_adapter(internal[name])
            idx = list(subsets[name]) if subsets and name in subsets else range(len(encoded))
            t0 = time.perf_counter()
            part = score_examples(
                model_log_probs(model, cache.split), [encoded[i] for i in idx], cache
            )
            out[name] = (scatter_scores(part, idx, len(encoded)), time.perf_counter() - t0)
    return out


def score_rows(
    base: BaseModel,
    encoded: Sequence[Encoded],
    cache: StateCache,
    adapters: Mapping[str, str | Path],
    *,
    subsets: Mapping[str, Sequence[int]] | None = None,
    include_base: bool = True,
) -> dict[str, ExampleScores]:
    """Scores of the base model and of each adapter (on ``subsets[name]`` only, if given)."""
    rows: dict[str, ExampleScores] = {}
    if include_base:
        rows[BASE_ROW] = score_examples(model_log_probs(base.model, cache.split), encoded, cache)
    for name, (scores, _) in score_adapters(base, encoded, cache, adapters, subsets).items():
        rows[name] = scores
    return rows


def scatter_scores(part: ExampleScores, idx: Sequence[int], n: int) -> ExampleScores:
    """Put subset scores back at their indices; unscored examples are NaN / False."""
    loss = np.full(n, np.nan)
    correct = np.zeros(n, dtype=bool)
    loss[list(idx)] = part.loss
    correct[list(idx)] = part.correct
    return ExampleScores(loss, correct)


def oracle(
    examples: Sequence[Example], rows: Mapping[str, ExampleScores], expert_of: Mapping[str, str]
) -> ExampleScores:
    """Each example scored by its own task's expert (the reference line)."""
    loss = np.array([rows[expert_of[ex.task]].loss[i] for i, ex in enumerate(examples)])
    correct = np.array([rows[expert_of[ex.task]].correct[i] for i, ex in enumerate(examples)])
    return ExampleScores(loss, correct)


def oracle_note(
    examples: Sequence[Example],
    expert_of: Mapping[str, str],
    untasked: Sequence[str],
    library: str | Path | None,
) -> str | None:
    """Why no oracle row can be made from a library's experts (None when it can)."""
    if untasked:
        return tasks_unknown("the oracle row", library or "the library", list(untasked))
    missing = sorted({ex.task for ex in examples} - set(expert_of))
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        return f"no oracle row: {library} has no private expert for task(s) {shown}"
    return None


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "lorafuse": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def evaluate_command(
    *,
    base_model: str,
    adapter: Path | None,
    library: Path | None,
    tasks: str,
    split: str,
    seed: int,
    out: Path,
    allow_pickle: bool = False,
) -> dict:
    """``lorafuse eval``: scores per task for base / adapter / every expert of a library."""
    opened: dict[str, LoraAdapter] = {}
    expert_of: dict[str, str] = {}
    no_tasks: list[str] = []
    if adapter is not None:
        a = LoraAdapter.open(adapter, allow_pickle=allow_pickle)
        opened[a.name] = a
    if library is not None:
        manifest, lib = open_library(library, allow_pickle=allow_pickle)
        opened.update(lib)
        expert_of = {
            e.tasks[0]: e.name for e in manifest.experts if e.kind == "private" and e.tasks
        }
        no_tasks = untasked(manifest)
    check_weights(list(opened.values()))
    # bad inputs fail before the model loads; --split all scores every line, unsplit
    suite = load_tasks(tasks, seed=seed, all_lines=split == ALL)
    examples = suite.get(split)
    base = load_base_model(base_model)
    check_compatible(list(opened.values()), base_model=base.model)
    cache = StateCache(base, choose_split(base, list(opened.values())))
    encoded = encode_examples(base.tokenizer, examples)
    rows = score_rows(base, encoded, cache, {n: a.path for n, a in opened.items()})
    notes = []
    if library is not None:
        note = oracle_note(examples, expert_of, no_tasks, library)
        if note is None:
            rows[ORACLE_ROW] = oracle(examples, rows, expert_of)
        else:
            notes.append(note)
    summaries = summaries_of(examples, rows, reference=rows.get(ORACLE_ROW))
    primary = ORACLE_ROW if ORACLE_ROW in rows else (next(iter(opened)) if opened else BASE_ROW)
    results = {
        **summaries[primary],
        "primary": primary,
        "methods": summaries,
        "config": {
            "base_model": base.name,
            "forward": cache.forward.describe(),
            "adapter": str(adapter) if adapter else None,
            "library": str(library) if library else None,
            "tasks": tasks,
            "split": split,
        },
        "seed": seed,
        "versions": versions(),
        "notes": notes,
    }
    results["table"] = markdown_table(summaries)
    atomic_write_json(out, results)
    return results


def summaries_of(
    examples: Sequence[Example],
    rows: Mapping[str, ExampleScores],
    reference: ExampleScores | None = None,
) -> dict[str, dict]:
    """``summarize`` every row, normalised by the reference row's per-task accuracy on the
    items that row scored (a row on an item budget against the reference on those items)."""
    from lorafuse.eval.harness import summarize

    out = {}
    for name, s in rows.items():
        ref_acc = None
        if reference is not None:
            same = ExampleScores(np.where(np.isnan(s.loss), np.nan, reference.loss),
                                 reference.correct)  # fmt: skip
            ref_acc = {t: r.accuracy for t, r in per_task(examples, same).items()}
        out[name] = summarize(per_task(examples, s), ref_acc)
    return out
