"""``lorafuse compare``: every fusion method of a library on the same test tasks, with costs.

Rows: references (base, multi-task adapter, oracle), ensembles, static and learned merges,
routers, ELREA (when the library has a build). Columns: mean test loss ± standard error
across tasks, exact match, normalised score (accuracy / own expert's), and cost: training
time (s), inference time per item (ms), stored bytes (MB). Then paired tests across tasks
(``eval.paired``) of the comparisons the papers make (:data:`PAIRED`). Written as
``results.json`` (``paired_tests``), ``report.md``, ``report.html``, ``methods.png`` (grouped
by family) and ``tasks.png``. Every row is a method of the one registry (``lorafuse.methods``)
with its defaults.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lorafuse.compare_report import PAIRED, Table, write_compare  # noqa: F401 (re-exported)
from lorafuse.elrea.methods import built_elrea
from lorafuse.errors import LorafuseError
from lorafuse.eval.harness import ExampleScores, model_log_probs, score_examples
from lorafuse.eval.run import (
    BASE_ROW,
    ORACLE_ROW,
    oracle,
    oracle_note,
    score_adapters,
)
from lorafuse.fusion.ensemble import score_ensembles
from lorafuse.fusion.run import on_subset, run_methods, source_bytes
from lorafuse.library import LoraAdapter, save_adapter
from lorafuse.library.manifest import tasks_unknown
from lorafuse.merging.learned import LearnedCoefficients, save_learned_merge
from lorafuse.methods import METHODS, RECENT_MERGES, STATIC_MERGES, build_fusion
from lorafuse.training.library import MULTITASK
from lorafuse.workspace import Workspace

# Rows are methods of the one registry (``lorafuse.methods``), built with its defaults.
ENSEMBLES = ("ensemble_prob", "ensemble_logit", "ensemble_learned")  # one pass of all experts
LEARNED = ("learned_global", "learned_per_layer")  # exported exactly as PEFT adapters
DISTILLED = ("ensemble_distilled",)
ROUTERS = ("arrow", "hc_arrow", "learned_router", "twin", "twin_group")
# The seed papers' remaining systems, rows only when asked for (``--seed-methods``)
SEED_ROWS = (
    "lorahub",
    "regmean",
    "sens_merging",
    "sens_merging_ties",
    "sens_merging_dare",
    "dam",
    "lora_retriever",
    "emr",
    "emr_retriever",
    "mc_smoe",
)
# rows whose method needs each expert's task (Twin's router labels, EMR's oracle routing)
TASK_ROUTERS = frozenset({"twin", "twin_group", "emr"})
ENSEMBLE_VAL_PER_TASK = 25  # validation items per task to fit the ensemble weights on
# Ensembles run every expert on every item: beyond DENSE_K experts they get a budget of
# about ENSEMBLE_ITEMS expert-items per task (K = 48: 5 test and 4 validation items per task).
DENSE_K = 16
ENSEMBLE_ITEMS = 256


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


def ensemble_caps(k: int, items: int | None = None) -> tuple[int | None, int]:
    """(test items per task or None = all, validation items per task) for K experts;
    ``items`` (test items per task) overrides the test budget at any K."""
    if k <= DENSE_K:
        return items, ENSEMBLE_VAL_PER_TASK
    return items or max(4, ENSEMBLE_ITEMS // k), max(4, ENSEMBLE_ITEMS // (2 * k))


def ensembles(ws: Workspace, table: Table, seed: int, items: int | None = None) -> None:
    """Uniform mixture of probabilities, of logits, and learned mixture weights (val), scored
    in one batched pass of all experts (within a budget of items beyond ``DENSE_K``, or on
    ``items`` test items per task)."""
    k = len(ws.private)
    test_cap, val_cap = ensemble_caps(k, items)
    fused = {row: build_fusion(ws, row, seed=seed, val_per_task=val_cap) for row in ENSEMBLES}
    experts = fused[ENSEMBLES[0]].sources
    variants = {row: (f.ensemble.weights, f.ensemble.mode) for row, f in fused.items()}
    test = ws.per_task("test", test_cap)
    t0 = time.perf_counter()
    encoded = [ws.encoded("test")[i] for i in test]
    scored = score_ensembles(ws.base.model, experts, encoded, ws.cache, variants)
    infer_ms = 1e3 * (time.perf_counter() - t0) / len(test)
    stored = _mb(source_bytes(experts))
    if test_cap is not None:
        n = len(ws.encoded("test"))
        scored = {row: on_subset(s, test, n) for row, s in scored.items()}
        table.notes.append(
            f"ensembles at K = {k}: scored on the first {test_cap} test items per "
            f"task, weights fitted on {val_cap} validation items per task (budget)"
        )
    for row, scores in scored.items():
        info = dict(fused[row].info)
        train = info.pop("train_s", 0.0)
        table.add(row, "ensembling", scores, train_s=train, infer_ms=infer_ms, stored_mb=stored)
        if info:
            table.info[row] = info


def truncation_line(info: dict) -> str:
    """The model card's line on re-compression (empty when the merge kept every delta)."""
    if "truncation_rel_error_mean" not in info:
        return ""
    return (
        f"\nRe-compressed to rank {info['truncation_rank_min']}-{info['truncation_rank_max']}: "
        f"relative Frobenius error mean {info['truncation_rel_error_mean']:.4f}, "
        f"max {info['truncation_rel_error_max']:.4f}; energy kept "
        f"{info['truncation_energy_kept_total']:.4f}.\n"
    )


def merges(
    ws: Workspace,
    table: Table,
    out: Path,
    seed: int,
    rows: Mapping[str, tuple[str, dict]] = STATIC_MERGES,
    learned_rows: Sequence[str] = LEARNED,
) -> None:
    """Static merges (``rows``: the registry's ``merge`` with those parameters) and learned
    merges (``learned_rows``), saved as PEFT adapters under ``out/merged`` and scored."""
    paths: dict[str, Path] = {}
    made_s: dict[str, float] = {}
    for row, (method, params) in rows.items():
        params = dict(params)
        row_seed = params.pop("seed", seed)
        t0 = time.perf_counter()
        try:
            fusion = build_fusion(ws, "merge", seed=row_seed, method=method, **params)
        except LorafuseError as err:  # e.g. lowrank_average on experts of mixed ranks
            table.notes.append(f"{row} left out: {err}")
            continue
        made_s[row] = time.perf_counter() - t0
        paths[row] = save_adapter(
            out / "merged" / row,
            fusion.sources[0].modules,
            base_model=ws.base.name,
            readme=f"lorafuse merge of the private experts: {method} {rows[row][1]}\n"
            + truncation_line(fusion.info),
        )
        lost = {k: v for k, v in fusion.info.items() if k.startswith("truncation_")}
        if lost:
            table.info[row] = lost
    for row in learned_rows:
        fusion = build_fusion(ws, row, seed=seed)
        info = fusion.info
        learned = LearnedCoefficients(
            torch.tensor(info["coefficients"]),
            info["layers"],
            info["objective_history"],
            info["train_s"],
        )
        made_s[row] = learned.seconds
        config = {"method": row, "split": "val", "seed": seed, **METHODS[row].defaults}
        paths[row] = save_learned_merge(
            learned, ws.private, out / "merged" / row, config, base_model=ws.base.name
        )
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
    ws: Workspace,
    table: Table,
    methods: Sequence[str],
    seed: int,
    *,
    budget: bool = False,
    items: int | None = None,
) -> None:
    """Methods of the registry built by name on the mixture core (routers, ELREA), fitted and
    scored with their defaults. ``budget``: a method that runs every adapter on every item
    (ELREA's cluster ensembles) is scored on :func:`ensemble_caps`' items (``items``)."""
    cap = (lambda n: ensemble_caps(n, items)[0]) if budget else None
    rows: dict[str, ExampleScores] = {}
    info: dict[str, dict] = {}
    for name in methods:
        try:  # e.g. lorahub's composition on experts of mixed ranks
            r, i = run_methods(ws, {name: (name, {})}, "test", seed=seed, items_cap=cap)
        except LorafuseError as err:
            table.notes.append(f"{name} left out: {err}")
            continue
        rows.update(r)
        info.update(i)
    for row, scores in rows.items():
        if "items_per_task" in info[row]["extra"]:
            table.notes.append(
                f"{row} runs all its adapters on every item: scored on the first "
                f"{info[row]['extra']['items_per_task']} test items per task (budget)"
            )
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


def new_table(ws: Workspace, skip: frozenset[str]) -> tuple[Table, frozenset[str]]:
    """An empty results table, and the rows to skip: without task labels also the routers
    that learn from them (Twin's), said in a note."""
    table = Table()
    if ws.untasked:
        skip = skip | TASK_ROUTERS
        table.notes.append(tasks_unknown("twin", ws.library, ws.untasked))
    return table, skip


def cache_states(ws: Workspace) -> float:
    """Compute the test and validation states once, for every method; the seconds it took."""
    t0 = time.perf_counter()
    ws.cache.get(ws.encoded("test"), desc="test states (once, shared by all methods)")
    ws.cache.get(ws.encoded("val"), desc="val states (for methods that learn)")
    return time.perf_counter() - t0


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
    seed_methods: bool = False,
    heavy_items: int | None = None,
) -> dict:
    """Every method on the workspace's test split; writes and returns the results.

    ``elrea_rows`` limits the ELREA rows (each is a batched pass of all its adapters);
    ``distil=False`` skips distilling the ensemble into one LoRA (a few minutes of training);
    ``skip`` names routing rows to leave out; ``recent_merges`` adds the rows of
    :data:`lorafuse.fusion.methods.RECENT_MERGES`; ``seed_methods`` the rows of
    :data:`SEED_ROWS` (LoRAHub, RegMean, Sens-Merging, DAM, LoraRetriever, EMR, MC-SMoE);
    ``heavy_items``: score the rows that run every adapter on every item (the ensembles,
    ELREA) on the first that many test items per task (paired tests use the common items).
    """
    started = time.perf_counter()
    out = Path(out)
    table, skip = new_table(ws, skip)
    timings = {"state_cache_s": cache_states(ws)}
    static_rows = {**STATIC_MERGES, **(RECENT_MERGES if recent_merges else {})}
    steps = [
        ("references_s", lambda: references(ws, table)),
        ("ensembles_s", lambda: ensembles(ws, table, seed, heavy_items)),
        ("distil_s", lambda: fusions(ws, table, DISTILLED if distil else (), seed)),
        ("merges_s", lambda: merges(ws, table, out, seed, static_rows)),
        ("routing_s", lambda: fusions(ws, table, [r for r in ROUTERS if r not in skip], seed)),
        (
            "seed_methods_s",
            lambda: fusions(
                ws, table, [r for r in SEED_ROWS if seed_methods and r not in skip], seed
            ),
        ),
        (
            "elrea_s",
            lambda: fusions(
                ws, table, built_elrea(ws, elrea_rows), seed, budget=True, items=heavy_items
            ),
        ),
    ]
    for key, step in steps:
        t0 = time.perf_counter()
        step()
        timings[key] = time.perf_counter() - t0
        print(f"{key[:-2]}: {timings[key]:.0f}s", flush=True)
    timings["total_s"] = time.perf_counter() - started
    return write_compare(ws, out, table, timings, seed=seed, title=title)
