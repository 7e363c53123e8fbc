"""``lorafuse compare --ray``: the rows of ``compare`` as Ray tasks, resumable.

One Ray task per method row (a *unit*), except the rows ``compare`` makes in one shared pass:
``references`` (base model, multi-task adapter, oracle) and ``ensembles`` (the three
ensembles, one batched pass of all experts). A unit runs exactly the serial code
(:mod:`lorafuse.compare`'s ``references``, ``ensembles``, ``merges``, ``fusions``) on a
workspace rebuilt in the worker, with the same seed, so its scores equal the serial run's
(bit for bit on the same device and torch thread count; only the measured costs differ).

Shared state lives on a **shared filesystem**, not in the object store: the driver fills the
lower-layer state cache (``$LORAFUSE_CACHE/states``, default ``~/.cache/lorafuse/states``)
with the test and validation states once before submitting, and every worker reads those
shards (and adds any others a method needs, e.g. a router's training states); the library
and the output folder (merged adapters) must be on it too. Only the base model of a model
without a folder (tests) and the encoded task suite travel through the object store.

Each finished unit is written atomically to ``OUT/partial/UNIT.json`` with the run's stamp
(:mod:`lorafuse.fingerprint`: seed, library files, examples, base model and split); a rerun
reuses those and runs only the missing units. A partial folder from another configuration is
refused with one line (use another ``--out`` or delete it).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafuse.compare import (
    DISTILLED,
    LEARNED,
    ROUTERS,
    SEED_ROWS,
    Table,
    cache_states,
    ensembles,
    fusions,
    merges,
    new_table,
    references,
    write_compare,
)
from lorafuse.core.encode import Encoded
from lorafuse.core.states import StateCache
from lorafuse.elrea.methods import CLUSTERING_OF, built_elrea
from lorafuse.elrea.pipeline import elrea_dir
from lorafuse.errors import LorafuseError
from lorafuse.eval.harness import ExampleScores
from lorafuse.fingerprint import (
    FINGERPRINT_NAME,
    Stamp,
    digest,
    examples_digest,
    files_digest,
    read_stamp,
    refuse_mismatch,
    write_stamp,
)
from lorafuse.io import atomic_write_json, read_json
from lorafuse.library import open_library
from lorafuse.methods import RECENT_MERGES, STATIC_MERGES
from lorafuse.models import BaseModel
from lorafuse.tasks.example import TaskSuite
from lorafuse.training.distributed import (
    connect,
    import_ray,
    raise_first,
    shipped_base,
    submit_options,
    worker_base,
)
from lorafuse.workspace import Workspace

PARTIAL_DIR = "partial"
FORMAT = 1  # of the partial results; part of the stamp
REFERENCES, ENSEMBLE_UNIT = "references", "ensembles"
HINT = "use another --out, or delete its partial/ folder to start over"


@dataclass(frozen=True)
class Unit:
    """One Ray task: ``name`` (a row, or ``references`` / ``ensembles``), the serial
    step it belongs to (its timings key) and how it runs (``kind``)."""

    name: str
    step: str
    kind: str  # references | ensembles | merge | learned | fusion | elrea


def plan_units(
    ws: Workspace,
    *,
    distil: bool = True,
    skip: frozenset[str] = frozenset(),
    recent_merges: bool = False,
    seed_methods: bool = False,
    elrea_rows: list[str] | None = None,
) -> list[Unit]:
    """The units of ``run_compare``'s rows, in its order (the order of the table)."""
    static = {**STATIC_MERGES, **(RECENT_MERGES if recent_merges else {})}
    return [
        Unit(REFERENCES, "references_s", "references"),
        Unit(ENSEMBLE_UNIT, "ensembles_s", "ensembles"),
        *(Unit(row, "distil_s", "fusion") for row in (DISTILLED if distil else ())),
        *(Unit(row, "merges_s", "merge") for row in static),
        *(Unit(row, "merges_s", "learned") for row in LEARNED),
        *(Unit(row, "routing_s", "fusion") for row in ROUTERS if row not in skip),
        *(
            Unit(row, "seed_methods_s", "fusion")
            for row in SEED_ROWS
            if seed_methods and row not in skip
        ),
        *(Unit(row, "elrea_s", "elrea") for row in built_elrea(ws, elrea_rows)),
    ]


def run_unit(ws: Workspace, unit: Unit, out: Path, seed: int, recent_merges: bool) -> Table:
    """The unit's rows, computed by the serial compare's own functions."""
    table = Table()
    if unit.kind == "references":
        references(ws, table)
    elif unit.kind == "ensembles":
        ensembles(ws, table, seed)
    elif unit.kind == "merge":
        static = {**STATIC_MERGES, **(RECENT_MERGES if recent_merges else {})}
        merges(ws, table, out, seed, {unit.name: static[unit.name]}, learned_rows=())
    elif unit.kind == "learned":
        merges(ws, table, out, seed, {}, learned_rows=(unit.name,))
    else:
        fusions(ws, table, (unit.name,), seed, budget=unit.kind == "elrea")
    return table


def compare_stamp(ws: Workspace, seed: int) -> Stamp:
    """The run a partial result belongs to: seed and library files (adapters, ELREA builds),
    the examples of every split (ids and tasks), the base model and its split layer."""
    files = [ws.library / "library.json"]
    for adapter in ws.adapters.values():
        files += [adapter.path / "adapter_config.json", adapter.weights_path]
    for clustering in sorted(set(CLUSTERING_OF.values())):
        build = elrea_dir(ws.library, clustering)
        files += [build / n for n in ("elrea.json", FINGERPRINT_NAME) if (build / n).is_file()]
    splits = sorted(ws.suite.splits)
    return Stamp.of(
        {"compare": FORMAT, "seed": seed, "library": files_digest(f for f in files if f.is_file())},
        {
            s: [examples_digest(ws.encoded(s)), digest([e.task for e in ws.examples(s)])]
            for s in splits
        },
        {"base": ws.base.fingerprint, "split": ws.cache.split, "forward": ws.forward.describe()},
    )


def table_part(table: Table, stamp: Stamp, seconds: float) -> dict:
    """A unit's rows as JSON (per-example scores exactly: floats round-trip)."""
    rows = {
        row: {
            "family": table.family[row],
            "costs": table.costs[row],
            "loss": s.loss.tolist(),
            "correct": s.correct.tolist(),
            "correct_dtype": str(s.correct.dtype),
            **({"info": table.info[row]} if row in table.info else {}),
        }
        for row, s in table.scores.items()
    }
    return {"stamp": stamp.as_dict(), "rows": rows, "notes": table.notes, "seconds": seconds}


def add_part(table: Table, part: dict) -> None:
    """Put a unit's rows (from :func:`table_part`) into the table, in their order."""
    for row, r in part["rows"].items():
        loss = np.array(r["loss"], dtype=float)
        correct = np.array(r["correct"], dtype=r["correct_dtype"])
        table.add(row, r["family"], ExampleScores(loss, correct), **r["costs"])
        if "info" in r:
            table.info[row] = r["info"]
    table.notes.extend(part["notes"])


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker rebuilds the workspace from (the base model travels beside it)."""

    key: str  # the run's stamp and device: workspaces are reused by a worker within a run
    library: str
    suite: TaskSuite
    encoded: dict[str, list[Encoded]]
    split: int
    cache_dir: str | None
    device: str
    threads: int


_WORKSPACES: dict[str, Workspace] = {}  # per worker process: the run's workspace, reused


def worker_workspace(base: str | BaseModel, spec: WorkerSpec) -> Workspace:
    """The driver's workspace, rebuilt in a worker (once per run and process)."""
    if spec.key not in _WORKSPACES:
        model = worker_base(base, spec.device, spec.threads)
        library = Path(spec.library)
        manifest, adapters = open_library(library)
        directory = Path(spec.cache_dir) if spec.cache_dir else None
        cache = StateCache(model, spec.split, directory, persist=directory is not None,
                           progress=False)  # fmt: skip
        _WORKSPACES.clear()
        _WORKSPACES[spec.key] = Workspace(
            model, spec.suite, library, manifest, adapters, cache, dict(spec.encoded)
        )
    return _WORKSPACES[spec.key]


def unit_task(
    base: str | BaseModel,
    spec: WorkerSpec,
    unit: Unit,
    out: str,
    seed: int,
    recent_merges: bool,
    stamp: dict,
) -> dict:
    """One unit in a Ray worker: computed, then written atomically to ``partial/``."""
    ws = worker_workspace(base, spec)
    t0 = time.perf_counter()
    table = run_unit(ws, unit, Path(out), seed, recent_merges)
    part = table_part(table, Stamp(**stamp), time.perf_counter() - t0)
    atomic_write_json(Path(out) / PARTIAL_DIR / f"{unit.name}.json", part)
    return part


def finished_parts(folder: Path, units: Sequence[Unit], stamp: Stamp) -> dict[str, dict]:
    """The units already written by this run; another run's partial folder is refused."""
    marker = folder / FINGERPRINT_NAME
    if folder.is_dir() and any(folder.glob("*.json")):
        refuse_mismatch(marker, read_stamp(marker), stamp, "partial results", HINT)
    else:
        write_stamp(marker, stamp, written_by="lorafuse compare --ray")
    parts = {}
    for unit in units:
        path = folder / f"{unit.name}.json"
        if path.is_file():
            part = read_json(path)
            refuse_mismatch(path, Stamp.from_dict(part.get("stamp")), stamp, "result", HINT)
            parts[unit.name] = part
    return parts


def run_compare_ray(
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
    only: Collection[str] | None = None,
    address: str = "auto",
    cpus_per_method: int = 1,
    gpus_per_method: float | None = None,
) -> dict:
    """:func:`lorafuse.compare.run_compare` with one Ray task per unit (:func:`plan_units`;
    ``only``: just these units), resumable from ``out/partial``. Returns the results, with
    ``reused``: the units read back from an earlier run."""
    ray = import_ray()
    started = time.perf_counter()
    out = Path(out).resolve()
    table, skip = new_table(ws, skip)
    units = plan_units(
        ws,
        distil=distil,
        skip=skip,
        recent_merges=recent_merges,
        seed_methods=seed_methods,
        elrea_rows=elrea_rows,
    )
    if only is not None:
        unknown = sorted(set(only) - {u.name for u in units})
        if unknown:
            raise LorafuseError(f"no such compare row here: {', '.join(unknown)}")
        units = [u for u in units if u.name in only]
    stamp = compare_stamp(ws, seed)
    parts = finished_parts(out / PARTIAL_DIR, units, stamp)
    reused = list(parts)
    todo = [u for u in units if u.name not in parts]
    timings: dict[str, float] = {}
    if todo:
        timings["state_cache_s"] = cache_states(ws)
        parts.update(submit_units(ray, ws, todo, out, seed, recent_merges, stamp, address,
                                  cpus_per_method, gpus_per_method))  # fmt: skip
    for unit in units:
        add_part(table, parts[unit.name])
        timings[unit.step] = timings.get(unit.step, 0.0) + parts[unit.name]["seconds"]
    timings["total_s"] = time.perf_counter() - started
    results = write_compare(ws, out, table, timings, seed=seed, title=title)
    results["reused"] = reused
    return results


def submit_units(
    ray,
    ws: Workspace,
    todo: Sequence[Unit],
    out: Path,
    seed: int,
    recent_merges: bool,
    stamp: Stamp,
    address: str,
    cpus: int,
    gpus: float | None,
) -> dict[str, dict]:
    """Run the units on the cluster; every finished one is kept even if another fails."""
    connect(address)
    resources, device = submit_options(ray, cpus, gpus)
    directory = ws.cache.directory
    spec = WorkerSpec(
        key=f"{digest(stamp.as_dict())}-{device}-{time.time_ns()}",
        library=str(Path(ws.library).resolve()),
        suite=ws.suite,
        encoded={s: ws.encoded(s) for s in ws.suite.splits},
        split=ws.cache.split,
        cache_dir=str(Path(directory).resolve()) if directory is not None else None,
        device=device,
        threads=cpus,
    )
    remote = ray.remote(unit_task)
    base_arg, spec_ref = shipped_base(ray, ws.base), ray.put(spec)
    running = {
        remote.options(**resources, name=f"lorafuse:compare:{unit.name}").remote(
            base_arg, spec_ref, unit, str(out), seed, recent_merges, stamp.as_dict()
        ): unit
        for unit in todo
    }
    parts: dict[str, dict] = {}
    failures: list[tuple[str, BaseException]] = []
    while running:
        done, _ = ray.wait(list(running), num_returns=1)
        unit = running.pop(done[0])
        try:
            parts[unit.name] = ray.get(done[0])
        except ray.exceptions.RayError as err:
            failures.append((unit.name, err))
            continue
        print(f"{unit.name}: {parts[unit.name]['seconds']:.0f}s (ray)", flush=True)
    raise_first(failures, "compare row")
    return parts


__all__ = ["Unit", "WorkerSpec", "compare_stamp", "plan_units", "run_compare_ray"]
