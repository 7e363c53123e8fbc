"""The package's layers are one-way: helpers -> core and library (side by side) -> tasks ->
eval/training -> merging ->
(the application's Workspace) -> fusion -> elrea/analysis -> compare/serving -> cli. No module
imports a module of a higher layer, lazily inside a function or not (ELREA builds on fusion,
so fusion must not know it; merges take deltas and data, not the application)."""

from __future__ import annotations

import ast
from pathlib import Path

import lorafuse

ROOT = Path(lorafuse.__file__).parent
LAYER = {
    # helpers every layer may use
    "errors": 0, "io": 0, "fingerprint": 0, "device": 0, "failures": 0, "models": 0,
    "factors": 0,  # LoRA factors: read by library, computed with by core
    "core": 1, "library": 1,  # side by side: neither imports the other
    "tasks": 1.5,  # BIG-bench's token-length filter encodes with core
    "eval": 2, "training": 2,
    "merging": 3,
    "workspace": 3.5,
    "fusion": 4,
    "elrea": 5, "analysis": 5,
    "methods": 5.5,  # the one registry, filled from every family below it
    "compare": 6, "compare_ray": 6, "compare_report": 6, "serving": 6,
    "demo": 7, "commands": 7, "cli": 7, "__main__": 7,
}  # fmt: skip
SIDE_BY_SIDE = {"core", "library"}


def part_of(module: str) -> str:
    """``lorafuse.fusion.twin`` -> ``fusion``; the package root (``__version__``) -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute ``lorafuse`` import in a file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
    return [(line, m) for line, m in out if m == "lorafuse" or m.startswith("lorafuse.")]


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()}
    parts = {p for p in parts if not p.startswith((".", "_")) and p not in ("data", "py")}
    assert parts <= set(LAYER), sorted(parts - set(LAYER))


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        mine = rel.parts[0].removesuffix(".py")
        if mine == "__init__":
            continue
        for line, module in imports(path):
            theirs = part_of(module)
            side_by_side = {mine, theirs} <= SIDE_BY_SIDE
            if theirs and theirs != mine and (LAYER[theirs] > LAYER[mine] or side_by_side):
                wrong.append(f"{rel}:{line} ({mine}) imports {module} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_lazy_upward_import(tmp_path: Path) -> None:
    file = tmp_path / "m.py"
    file.write_text("def f():\n    from lorafuse.elrea.pipeline import build_elrea\n")
    assert imports(file) == [(2, "lorafuse.elrea.pipeline")]
    assert LAYER[part_of("lorafuse.elrea.pipeline")] > LAYER["fusion"]
