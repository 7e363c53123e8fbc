"""A wheel ships exactly what is under src/lorafuse/data: pyproject's package-data globs,
read the way setuptools reads them, match every file there, and each glob matches some."""

from __future__ import annotations

import glob
import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lorafuse"


def package_data_globs() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return config["tool"]["setuptools"]["package-data"]["lorafuse"]


def matched(pattern: str) -> set[Path]:
    # setuptools: glob(package_dir / pattern, recursive=True), regular files only
    hits = glob.glob(os.path.join(PACKAGE, pattern), recursive=True)
    return {Path(h).relative_to(PACKAGE) for h in hits if os.path.isfile(h)}


def test_every_data_file_is_package_data() -> None:
    shipped = set().union(*(matched(p) for p in package_data_globs()))
    on_disk = {
        p.relative_to(PACKAGE)
        for p in (PACKAGE / "data").rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.parts)
    }
    assert on_disk, "no data files found"
    assert sorted(map(str, on_disk - shipped)) == []
    assert any("elrea" in p.parts for p in shipped)  # the shipped ELREA builds


def test_every_glob_matches_a_file() -> None:
    assert [p for p in package_data_globs() if not matched(p)] == []
