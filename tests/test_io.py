"""lorafuse.io: atomic files and directories never leave partial output behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_writes(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "sub" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2]})
    atomic_write_text(tmp_path / "t.txt", "replaced")
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text() == "replaced"
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2]}
    assert (tmp_path / "j.json").read_text().endswith("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.json", "sub", "t.txt"]
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_failed_json_write_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "j.json"
    atomic_write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["j.json"]


def test_atomic_dir_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_atomic_dir_failure_keeps_old_dir_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("half-written")
        raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_failure_without_existing_target(tmp_path: Path) -> None:
    with pytest.raises(KeyError), atomic_dir(tmp_path / "new"):
        raise KeyError("x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_to_replace_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(LorafuseError, match="not a directory"), atomic_dir(target):
        pass
    assert target.read_text() == "x"
