"""``lorafuse compare``: every fusion method of a library on the same test tasks, with costs.

Rows: references (base, multi-task adapter, oracle), ensembles, static and learned merges,
routers, ELREA (when the library has a build). Columns: mean test loss ± standard error
across tasks, exact match, normalised score (accuracy / own expert's), and cost: training
time (s), inference time per item (ms), stored bytes (MB). Written as ``results.json``,
``report.md``, ``report.html``, ``methods.png`` (grouped by family) and ``tasks.png``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafuse.eval.harness import ExampleScores, model_log_probs, score_examples
from lorafuse.eval.report import html_report, markdown_table, plot_methods, plot_task_heatmap
from lorafuse.eval.run import (
    BASE_ROW,
    ORACLE_ROW,
    oracle,
    oracle_note,
    score_adapters,
    summaries_of,
    versions,
)
from lorafuse.fusion.ensemble import fit_mixture_weights, score_ensembles, target_log_probs
from lorafuse.fusion.run import run_methods, source_bytes
from lorafuse.io import atomic_write_json, atomic_write_text
from lorafuse.library import LoraAdapter, save_adapter
from lorafuse.library.manifest import tasks_unknown
from lorafuse.merging import merge
from lorafuse.merging.learned import learned_merge, save_learned_merge
from lorafuse.merging.run import truncation_card
from lorafuse.training.library import MULTITASK
from lorafuse.workspace import Workspace

# Static merges of the private experts: row -> (method, parameters).
MERGES: dict[str, tuple[str, dict]] = {
    "uniform_average": ("linear", {}),  # exact full-rank mean of the deltas
    "lowrank_average": ("lowrank_average", {}),  # mean of A's and of B's (cross-terms)
    "task_arithmetic": ("task_arithmetic", {"scale": 0.3}),
    "ties": ("ties", {"density": 0.2, "scale": 1.0}),
    "dare_ties": ("dare_ties", {"density": 0.5, "scale": 1.0, "seed": 0}),
}
# The merges since 2024 (``lorafuse methods``), rows only when asked for
# (``run_compare(recent_merges=True)``, ``lorafuse compare --recent-merges``). Settings from
# each paper or its reference code; scale 0.3 (as task_arithmetic above) where a method adds
# the task vectors up, 1 where it averages them or sets the magnitude itself.
RECENT_MERGES: dict[str, tuple[str, dict]] = {
    "della": ("della", {"density": 0.5, "epsilon": 0.15, "seed": 0}),
    "della_linear": ("della_linear", {"density": 0.5, "epsilon": 0.15, "scale": 0.3}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.9, "gamma": 0.01, "scale": 0.3}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.9, "gamma": 0.01, "scale": 0.3}),
    "pcb": ("pcb", {"density": 0.1}),
    "tsv_m": ("tsv_m", {"scale": 1.0}),
    "tsv_c": ("tsv_c", {"scale": 0.3}),
    "iso_c": ("iso_c", {"scale": 1.0}),
    "iso_cts": ("iso_cts", {"scale": 1.0, "common_fraction": 0.8}),
    "knots": ("knots", {"density": 0.2, "scale": 0.6}),
    "core_space": ("core_space", {"inner": "ties", "density": 0.2}),
    "wudi": ("wudi", {}),
}
# Merge coefficients learned on the validation split (row -> per layer?), exported exactly.
LEARNED: dict[str, bool] = {"learned_global": False, "learned_per_layer": True}
LEARN_SETTINGS = {"steps": 40, "lr": 0.1}
ENSEMBLE_VAL_PER_TASK = 25  # validation items per task to fit the ensemble weights on
DISTILLED: dict[str, tuple[str, dict]] = {"ensemble_distilled": ("ensemble_distilled", {})}
# Routing methods (fitted on the validation split where they learn): row -> (method, params).
ROUTERS: dict[str, tuple[str, dict]] = {
    "arrow": ("arrow", {}),
    "hc_arrow": ("hc_arrow", {}),
    "learned_router": ("learned_router", {}),
    "twin": ("twin", {}),
    "twin_group": ("twin_group", {}),
}
TASK_ROUTERS = frozenset({"twin", "twin_group"})  # routers trained on each expert's task
# ELREA rows, when the library has the builds (``lorafuse elrea``).
ELREA: dict[str, tuple[str, dict]] = {
    "elrea": ("elrea", {}),
    "elrea_uniform": ("elrea_uniform", {}),
    "elrea_random": ("elrea_random", {}),
    "elrea_embedding": ("elrea_embedding", {}),
}


@dataclass
class Table:
    """Scores, families and costs of every row, in display order."""

    scores: dict[str, ExampleScores] = field(default_factory=dict)
    family: dict[str, str] = field(default_factory=dict)
    costs: dict[str, dict[str, float | None]] = field(default_factory=dict)
    info: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # rows left out, and why

    def add(self, row: str, family: str, scores: ExampleScores, **costs: float | None) -> None:
        self.scores[row] = scores
        self.family[row] = family
        self.costs[row] = costs


def _mb(n: int | float) -> float:
    return n / 2**20


def _trained_s(ws: Workspace, name: str) -> float | None:
    entry = next((e for e in ws.manifest.experts if e.name == name), None)
    return entry.metrics.get("wall_time_s") if entry else None


def references(ws: Workspace, table: Table) -> None:
    """Base model, multi-task adapter, and the oracle from the private experts."""
    examples, encoded = ws.examples("test"), ws.encoded("test")
    n = len(encoded)
    t0 = time.perf_counter()
    base = score_examples(model_log_probs(ws.base.model, ws.cache.split), encoded, ws.cache)
    table.add(
        BASE_ROW,
        "reference",
        base,
        train_s=0,
        infer_ms=1e3 * (time.perf_counter() - t0) / n,
        stored_mb=0,
    )
    note = oracle_note(examples, ws.expert_of, ws.untasked, ws.library)
    if note:
        table.notes.append(note)
    # the private experts are scored (on their own tasks) only to make the oracle row
    adapters = {name: a.path for name, a in ws.private.items()} if note is None else {}
    if MULTITASK in ws.adapters:
        adapters[MULTITASK] = ws.adapters[MULTITASK].path
    subsets = ws.own_subsets("test") if note is None else None
    scored = score_adapters(ws.base, encoded, ws.cache, adapters, subsets)
    if MULTITASK in scored:
        scores, secs = scored[MULTITASK]
        table.add(
            MULTITASK,
            "reference",
            scores,
            train_s=_trained_s(ws, MULTITASK),
            infer_ms=1e3 * secs / n,
            stored_mb=_mb(ws.adapters[MULTITASK].num_bytes),
        )
    if note is None:
        rows = {name: scored[name][0] for name in ws.private}
        train = [_trained_s(ws, name) for name in ws.private]
        table.add(
            ORACLE_ROW,
            "reference",
            oracle(examples, rows, ws.expert_of),
            train_s=sum(t for t in train if t) or None,
            infer_ms=1e3 * sum(scored[name][1] for name in ws.private) / n,
            stored_mb=_mb(source_bytes(ws.private.values())),
        )


def ensembles(ws: Workspace, table: Table) -> None:
    """Uniform mixture of probabilities, of logits, and learned mixture weights (val), from
    one batched pass of all experts."""
    experts = list(ws.private.values())
    k = len(experts)
    t0 = time.perf_counter()
    val = [ws.encoded("val")[i] for i in ws.per_task("val", ENSEMBLE_VAL_PER_TASK)]
    lp, rows = target_log_probs(ws.base.model, experts, val, ws.cache)
    learned = fit_mixture_weights(lp, rows)
    fit_s = time.perf_counter() - t0
    uniform = torch.full((k,), 1.0 / k)
    variants = {
        "ensemble_prob": (uniform, "prob"),
        "ensemble_logit": (uniform, "logit"),
        "ensemble_learned": (learned, "prob"),
    }
    t0 = time.perf_counter()
    scored = score_ensembles(ws.base.model, experts, ws.encoded("test"), ws.cache, variants)
    infer_ms = 1e3 * (time.perf_counter() - t0) / len(ws.encoded("test"))
    stored = _mb(source_bytes(experts))
    for row, scores in scored.items():
        train = fit_s if row == "ensemble_learned" else 0.0
        table.add(row, "ensembling", scores, train_s=train, infer_ms=infer_ms, stored_mb=stored)
    table.info["ensemble_learned"] = {"weights": learned.tolist()}


def merges(
    ws: Workspace,
    table: Table,
    out: Path,
    seed: int,
    rows: Mapping[str, tuple[str, dict]] = MERGES,
) -> None:
    """Static merges (``rows``) and learned merges, saved as PEFT adapters under
    ``out/merged`` and scored."""
    experts = list(ws.private.values())
    paths: dict[str, Path] = {}
    made_s: dict[str, float] = {}
    for row, (method, params) in rows.items():
        t0 = time.perf_counter()
        lost: dict = {}
        factors = merge(experts, method, progress=False, truncation=lost, **params)
        made_s[row] = time.perf_counter() - t0
        paths[row] = save_adapter(
            out / "merged" / row,
            factors,
            base_model=ws.base.name,
            readme=f"lorafuse merge of the private experts: {method} {params}\n"
            + truncation_card(lost),
        )
    for row, per_layer in LEARNED.items():
        config = {"per_layer": per_layer, "split": "val", "seed": seed, **LEARN_SETTINGS}
        learned = learned_merge(ws, per_layer=per_layer, seed=seed, **LEARN_SETTINGS)
        made_s[row] = learned.seconds
        paths[row] = save_learned_merge(ws, learned, out / "merged" / row, config)
    n = len(ws.encoded("test"))
    scored = score_adapters(ws.base, ws.encoded("test"), ws.cache, paths)
    for row, (scores, secs) in scored.items():
        size = LoraAdapter.open(paths[row]).num_bytes
        table.add(
            row,
            "merging",
            scores,
            train_s=made_s[row],
            infer_ms=1e3 * secs / n,
            stored_mb=_mb(size),
        )


def fusions(
    ws: Workspace, table: Table, methods: Mapping[str, tuple[str, dict]], seed: int
) -> None:
    """Methods built by name on the mixture core (routers, ELREA), fitted and scored."""
    rows, info = run_methods(ws, methods, "test", seed=seed)
    for row, scores in rows.items():
        i = info[row]
        table.add(
            row,
            i["family"],
            scores,
            train_s=i["train_s"],
            infer_ms=i["infer_ms"],
            stored_mb=i["stored_mb"],
        )
        table.info[row] = i["extra"]


def _without(methods: dict, skip: frozenset[str]) -> dict:
    return {row: spec for row, spec in methods.items() if row not in skip}


def available_elrea(ws: Workspace, rows: list[str] | None = None) -> dict[str, tuple[str, dict]]:
    from lorafuse.elrea.pipeline import elrea_dir

    have = {
        c
        for c in ("gradient", "random", "embedding")
        if (elrea_dir(ws.library, c) / "elrea.json").is_file()
    }
    need = {
        "elrea": "gradient",
        "elrea_uniform": "gradient",
        "elrea_random": "random",
        "elrea_embedding": "embedding",
    }
    wanted = rows or list(ELREA)
    return {row: spec for row, spec in ELREA.items() if need[row] in have and row in wanted}


def run_compare(
    ws: Workspace,
    out: str | Path,
    *,
    seed: int = 0,
    title: str = "",
    elrea_rows: list[str] | None = None,
    distil: bool = True,
    skip: frozenset[str] = frozenset(),
    recent_merges: bool = False,
) -> dict:
    """Every method on the workspace's test split; writes and returns the results.

    ``elrea_rows`` limits the ELREA rows (each is a batched pass of all its adapters);
    ``distil=False`` skips distilling the ensemble into one LoRA (a few minutes of training);
    ``skip`` names routing rows to leave out; ``recent_merges`` adds the rows of
    :data:`RECENT_MERGES`.
    """
    started = time.perf_counter()
    out = Path(out)
    timings: dict[str, float] = {}
    table = Table()
    if ws.untasked:  # Twin's router learns from task labels
        skip = skip | TASK_ROUTERS
        table.notes.append(tasks_unknown("twin", ws.library, ws.untasked))
    t0 = time.perf_counter()
    ws.cache.get(ws.encoded("test"), desc="test states (once, shared by all methods)")
    ws.cache.get(ws.encoded("val"), desc="val states (for methods that learn)")
    timings["state_cache_s"] = time.perf_counter() - t0
    static_rows = {**MERGES, **(RECENT_MERGES if recent_merges else {})}
    steps = [
        ("references_s", lambda: references(ws, table)),
        ("ensembles_s", lambda: ensembles(ws, table)),
        ("distil_s", lambda: fusions(ws, table, DISTILLED if distil else {}, seed)),
        ("merges_s", lambda: merges(ws, table, out, seed, static_rows)),
        ("routing_s", lambda: fusions(ws, table, _without(ROUTERS, skip), seed)),
        ("elrea_s", lambda: fusions(ws, table, available_elrea(ws, elrea_rows), seed)),
    ]
    for key, step in steps:
        t0 = time.perf_counter()
        step()
        timings[key] = time.perf_counter() - t0
        print(f"{key[:-2]}: {timings[key]:.0f}s", flush=True)
    timings["total_s"] = time.perf_counter() - started

    examples = ws.examples("test")
    reference = table.scores.get(ORACLE_ROW)
    summaries = summaries_of(examples, table.scores, reference=reference)
    for row, s in summaries.items():
        s["family"] = table.family[row]
        s["costs"] = table.costs[row]
        if row in table.info:
            s["info"] = table.info[row]
    md = markdown_table(summaries, table.costs, table.family)
    results = {
        "methods": summaries,
        "seed": seed,
        "library": str(ws.library),
        "timings": timings,
        "config": {
            "base_model": ws.base.name,
            "forward": ws.forward.describe(),
            "split": "test",
            "library_config": ws.manifest.config,
        },
        "versions": versions(),
        "notes": table.notes,
    }
    for note in table.notes:
        print(f"note: {note}", flush=True)
    title = title or "lorafuse compare"
    atomic_write_json(out / "results.json", results)
    plot_methods(
        summaries, out / "methods.png", title=f"{title} (test split)", families=table.family
    )
    plot_task_heatmap(summaries, out / "tasks.png")
    intro = (
        f"Library {ws.library}; {len(examples)} test examples over {len(ws.suite.tasks)} tasks. "
        "loss = mean answer-token NLL (answer + end-of-turn) ± standard error across tasks; "
        "acc = greedy exact match (%); norm = accuracy / own expert's accuracy; costs: "
        "training s (experts' own training not counted except for the oracle and multi-task "
        "rows), inference ms per item on this machine, stored MB."
    )
    if table.notes:
        intro += "\n\n" + "\n".join(f"- Note: {n}" for n in table.notes)
    footer = "Timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    atomic_write_text(
        out / "report.md",
        f"# {title}\n\n{intro}\n\n{md}\n\n![methods](methods.png)\n\n![tasks](tasks.png)\n\n"
        f"{footer}\n",
    )
    atomic_write_text(
        out / "report.html", html_report(title, intro, md, ["methods.png", "tasks.png"], footer)
    )
    results["table"] = md
    return results
