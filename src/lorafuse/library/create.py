"""Make a library from PEFT adapter folders, add to it, and describe it.

``create_library`` copies each adapter's files (config, weights, README) into
``OUT/experts/<name>`` and writes ``library.json``; the whole library is built in a temp
sibling and renamed into place, so a failed or interrupted run leaves nothing behind.
``add_expert`` copies one more adapter in (a temp folder renamed into place), then rewrites
the manifest atomically. ``library_rows`` describes any library, or a plain folder of
adapters, one row per expert.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_dir
from lorafuse.library.adapter import CONFIG_NAME, LoraAdapter
from lorafuse.library.compat import check_compatible
from lorafuse.library.manifest import (
    MANIFEST_NAME,
    UNKNOWN_BASE,
    ExpertEntry,
    LibraryManifest,
    load_manifest,
    new_manifest,
    open_library,
    write_manifest,
)

__all__ = ["add_expert", "create_library", "format_rows", "library_rows"]

EXPERTS_DIR = "experts"
_README = "README.md"


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``; None or empty -> ``[]`` (unknown)."""
    if spec is None:
        return []
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    return [p.strip() for p in parts if p.strip()]


def _per_adapter(values: Sequence | None, n: int, option: str) -> list | None:
    if not values:
        return None
    if len(values) != n:
        raise LorafuseError(
            f"{option} given {len(values)} times for {n} adapters (give it once per adapter, "
            "in the same order)"
        )
    return list(values)


def _folder_name(name: str, taken: set[str]) -> str:
    """A directory name for expert ``name``: the name itself when it is a plain file name,
    else a sanitised form; never one already ``taken``."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "expert"
    folder, k = base, 1
    while folder in taken:
        k += 1
        folder = f"{base}_{k}"
    return folder


def _copy_adapter(adapter: LoraAdapter, dest: Path) -> None:
    """Copy the files PEFT reads (config, weights, README), not checkpoints or optimiser."""
    dest.mkdir(parents=True, exist_ok=True)
    files = [adapter.path / CONFIG_NAME, adapter.weights_path, adapter.path / _README]
    for file in files:
        if file.is_file():
            shutil.copy2(file, dest / file.name)


def _base_of(adapters: Sequence[LoraAdapter]) -> str:
    named = [a.base_model for a in adapters if a.base_model]
    return named[0] if named else UNKNOWN_BASE


def create_library(
    out: str | Path,
    adapter_dirs: Sequence[str | Path],
    *,
    names: Sequence[str] | None = None,
    tasks: Sequence[str | Sequence[str] | None] | None = None,
    allow_pickle: bool = False,
) -> LibraryManifest:
    """Make a library at ``out`` from PEFT adapter folders; returns its manifest.

    ``names[k]`` names the k-th expert (default: its folder's name); ``tasks[k]`` lists the
    tasks it was trained on (``"a,b"`` or a list; default: unknown). Every adapter is opened
    and checked compatible with the others before anything is written; ``out`` must not exist.
    """
    out = Path(out)
    if not adapter_dirs:
        raise LorafuseError("give at least one adapter directory")
    if out.exists():
        raise LorafuseError("already exists (add experts to it with lorafuse library add)", out)
    adapters = [LoraAdapter.open(p, allow_pickle=allow_pickle) for p in adapter_dirs]
    names = _per_adapter(names, len(adapters), "--name") or [a.name for a in adapters]
    task_lists = [parse_tasks(t) for t in (_per_adapter(tasks, len(adapters), "--task") or [])]
    task_lists = task_lists or [[] for _ in adapters]
    for name, adapter in zip(names, adapters, strict=True):
        if not name.strip():
            raise LorafuseError("empty expert name", adapter.path)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LorafuseError(
            f"expert name(s) {', '.join(dupes)} used twice (rename with --name, once per adapter)"
        )
    check_compatible(adapters)
    taken: set[str] = set()
    entries = []
    for name, task_list in zip(names, task_lists, strict=True):
        folder = _folder_name(name, taken)
        taken.add(folder)
        entries.append(ExpertEntry(name=name, path=f"{EXPERTS_DIR}/{folder}", tasks=task_list))
    manifest = new_manifest(_base_of(adapters), entries)
    with atomic_dir(out) as tmp:
        for adapter, entry in zip(adapters, entries, strict=True):
            _copy_adapter(adapter, tmp / entry.path)
        write_manifest(tmp, manifest)
    return manifest


def add_expert(
    library: str | Path,
    adapter_dir: str | Path,
    *,
    name: str | None = None,
    tasks: str | Sequence[str] | None = None,
    allow_pickle: bool = False,
) -> LibraryManifest:
    """Copy one PEFT adapter into a library as a new expert; returns the new manifest.

    The adapter must be compatible with the library's experts and its name (default: its
    folder's name) new. Its files land in a temp folder renamed into place, then
    ``library.json`` is rewritten atomically.
    """
    library = Path(library)
    if library.is_dir() and not (library / MANIFEST_NAME).is_file():
        raise LorafuseError(
            f"no {MANIFEST_NAME}: a plain folder of adapters is read as it is; to add to it, "
            "copy the adapter folder in, or make a library with lorafuse library create",
            library,
        )
    manifest, experts = open_library(library, allow_pickle=allow_pickle)
    adapter = LoraAdapter.open(adapter_dir, allow_pickle=allow_pickle)
    name = adapter.name if name is None else name
    if not name.strip():
        raise LorafuseError("empty expert name", adapter.path)
    if any(e.name == name for e in manifest.experts):
        raise LorafuseError(f"the library already has an expert named {name!r} (use --name)")
    check_compatible([*experts.values(), adapter])
    taken = {Path(e.path).name for e in manifest.experts}
    taken |= {d.name for d in (library / EXPERTS_DIR).glob("*")}
    entry = ExpertEntry(
        name=name,
        path=f"{EXPERTS_DIR}/{_folder_name(name, taken)}",
        tasks=parse_tasks(tasks),
    )
    dest = library / entry.path
    with atomic_dir(dest) as tmp:
        _copy_adapter(adapter, tmp)
    manifest.experts.append(entry)
    try:
        write_manifest(library, manifest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return manifest


def _layers(adapter: LoraAdapter) -> str:
    """Layer indices the adapter touches, as ranges: ``0-29``, ``0,2,4-5``; ``-`` if none."""
    found = set()
    for module in adapter.module_names:
        number = next((p for p in module.split(".") if p.isdigit()), None)
        if number is not None:
            found.add(int(number))
    if not found:
        return "-"
    ordered, runs = sorted(found), []
    start = prev = ordered[0]
    for x in [*ordered[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(runs)


def _span(values: Sequence[float]) -> str:
    """``8`` when all equal, else ``4-16``."""
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def library_rows(library: str | Path, *, allow_pickle: bool = False) -> list[dict]:
    """One row per expert: name, rank, alpha, targets, layers, size (MB), tasks.

    ``rank`` and ``alpha`` are ranges where ``rank_pattern``/``alpha_pattern`` vary them
    (alpha is read back from each module's scaling; ``rs`` marks rsLoRA). ``targets`` are
    the module names' last parts that hold weights; ``tasks`` is ``?`` when unknown.
    """
    library = Path(library)
    manifest = load_manifest(library)
    root = library.parent if library.name == MANIFEST_NAME else library
    rows = []
    for entry in manifest.experts:
        adapter = LoraAdapter.open(root / entry.path, allow_pickle=allow_pickle)
        modules = adapter.module_names
        ranks = [adapter.module_rank(m) for m in modules]
        rslora = bool(adapter.config.get("use_rslora"))
        alphas = [
            adapter.scaling(m) * (r**0.5 if rslora else r)
            for m, r in zip(modules, ranks, strict=True)
        ]
        targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
        rows.append(
            {
                "name": entry.name,
                "rank": _span(ranks) if ranks else "-",
                "alpha": (_span([round(a, 4) for a in alphas]) if alphas else "-")
                + (" rs" if rslora else ""),
                "targets": ",".join(targets) or "-",
                "layers": _layers(adapter),
                "size": f"{adapter.num_bytes / 2**20:.2f} MB",
                "tasks": _few(entry.tasks),
            }
        )
    return rows


def _few(tasks: Sequence[str], show: int = 3) -> str:
    """``a,b,c (+5)``; ``?`` when the tasks are unknown."""
    more = f" (+{len(tasks) - show})" if len(tasks) > show else ""
    return ",".join(tasks[:show]) + more if tasks else "?"


def format_rows(rows: Sequence[dict]) -> str:
    """Rows as an aligned plain-text table with a header line."""
    if not rows:
        return "(no experts)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols).rstrip()]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(lines)
