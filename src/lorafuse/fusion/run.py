"""Build and evaluate fusion methods on a workspace; the ``results.json`` of the commands."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lorafuse.core.mixture import FactorSet
from lorafuse.errors import LorafuseError
from lorafuse.eval.harness import ExampleScores
from lorafuse.eval.report import markdown_table
from lorafuse.eval.run import (
    ORACLE_ROW,
    oracle,
    oracle_note,
    score_adapters,
    summaries_of,
    versions,
)
from lorafuse.fusion.base import evaluate
from lorafuse.fusion.methods import build_fusion  # registers this layer's methods
from lorafuse.fusion.params import check_params
from lorafuse.io import atomic_write_json
from lorafuse.library import LoraAdapter
from lorafuse.tasks.example import ALL
from lorafuse.workspace import Workspace, open_workspace


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``["top_k=2", "mode=logit"]`` -> ``{"top_k": 2, "mode": "logit"}`` (YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LorafuseError(f"--param wants KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def source_bytes(sources) -> int:
    """Stored size of adapters / in-memory factor sets (fp32 factors)."""
    total = 0
    for s in sources:
        if isinstance(s, LoraAdapter):
            total += s.num_bytes
        elif isinstance(s, FactorSet):
            total += s.num_bytes
    return total


def run_methods(
    ws: Workspace,
    methods: Mapping[str, tuple[str, dict[str, Any]]],
    split: str,
    *,
    seed: int = 0,
    items_cap: Callable[[int], int | None] | None = None,
) -> tuple[dict[str, ExampleScores], dict[str, dict]]:
    """Build (fit on validation) and score every ``row -> (method, params)`` on ``split``.

    ``info[row]`` holds the family, parameters and costs: ``train_s`` (the method's own
    training time, else its build time), ``infer_ms`` per item, ``stored_mb``.
    ``items_cap(number of adapters the method runs)`` -> items per task to score (None: all)
    is a budget for methods that run many adapters on every item; the items left out are NaN
    and ``extra["items_per_task"]`` records the cap.
    """
    encoded = ws.encoded(split)
    rows: dict[str, ExampleScores] = {}
    info: dict[str, dict] = {}
    for row, (name, params) in methods.items():
        t0 = time.perf_counter()
        fusion = build_fusion(ws, name, seed=seed, **params)
        t1 = time.perf_counter()
        cap = items_cap(len(fusion.sources)) if items_cap else None
        idx = ws.per_task(split, cap) if cap is not None else list(range(len(encoded)))
        scores = evaluate(ws.base.model, fusion, [encoded[i] for i in idx], ws.cache)
        rows[row] = scores if cap is None else on_subset(scores, idx, len(encoded))
        t2 = time.perf_counter()
        extra = dict(fusion.info)
        if cap is not None:
            extra["items_per_task"] = cap
        stored = source_bytes([*fusion.sources, *([fusion.shared] if fusion.shared else [])])
        info[row] = {
            "method": name,
            "family": fusion.family,
            "params": params,
            "train_s": extra.pop("train_s", t1 - t0),
            "infer_ms": 1e3 * (t2 - t1) / len(idx),
            "stored_mb": stored / 2**20,
            "extra": extra,
        }
        print(f"{row}: built in {t1 - t0:.0f}s, evaluated in {t2 - t1:.0f}s", flush=True)
    return rows, info


def on_subset(scores: ExampleScores, idx: list[int], n: int) -> ExampleScores:
    """Scores of items ``idx`` placed among ``n`` items; the others are NaN (not scored)."""
    loss, correct = np.full(n, np.nan), np.full(n, np.nan)
    loss[idx], correct[idx] = scores.loss, scores.correct
    return ExampleScores(loss, correct)


def expert_rows(ws: Workspace, split: str) -> dict[str, ExampleScores]:
    """Each private expert on its own task's examples, and the oracle row from them."""
    adapters = {n: a.path for n, a in ws.private.items()}
    scored = score_adapters(ws.base, ws.encoded(split), ws.cache, adapters, ws.own_subsets(split))
    rows = {name: scores for name, (scores, _) in scored.items()}
    rows[ORACLE_ROW] = oracle(ws.examples(split), rows, ws.expert_of)
    return rows


def fusion_command(
    *,
    methods: Sequence[str],
    params: dict[str, Any],
    base_model: str,
    library: Path | None,
    tasks: str,
    split: str,
    seed: int,
    out: Path,
    with_oracle: bool = False,
) -> dict:
    """``lorafuse eval --method`` / ``route`` / ``ensemble``: scores per task of each method."""
    if not methods:
        raise LorafuseError("name at least one --method")
    if split == ALL:
        raise LorafuseError(
            "--split all scores adapters as they are; fusion methods fit on the val split "
            "(use --split test)"
        )
    params = check_params(methods, params)  # before anything loads: one line, nothing written
    ws = open_workspace(base_model=base_model, library=library, tasks=tasks, seed=seed)
    rows, info = run_methods(ws, {m: (m, dict(params)) for m in methods}, split, seed=seed)
    reference, notes = None, []
    note = oracle_note(ws.examples(split), ws.expert_of, ws.untasked, ws.library)
    if with_oracle and note is None:
        reference = expert_rows(ws, split)[ORACLE_ROW]
        rows[ORACLE_ROW] = reference
    elif with_oracle:
        notes.append(note)
    summaries = summaries_of(ws.examples(split), rows, reference=reference)
    for row, extra in info.items():
        summaries[row]["info"] = extra
    primary = methods[0]
    results = {
        **summaries[primary],
        "primary": primary,
        "methods": summaries,
        "config": {
            "base_model": ws.base.name,
            "forward": ws.forward.describe(),
            "library": str(ws.library),
            "tasks": tasks,
            "split": split,
            "params": params,
        },
        "seed": seed,
        "versions": versions(),
        "notes": notes,
        "table": markdown_table(summaries),
    }
    atomic_write_json(out, results)
    return results
