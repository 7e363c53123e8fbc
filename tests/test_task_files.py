"""Task files: split errors name the task, the file and the line; ``all_lines`` keeps every line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafuse.errors import LorafuseError
from lorafuse.tasks import load_tasks
from lorafuse.tasks.example import ALL, SPLITS


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(task: str, n: int, **extra) -> list[dict]:
    return [{"task": task, "prompt": f"{task} {i}", "answer": "a", **extra} for i in range(n)]


def test_too_small_task_names_task_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", rows("big", 30) + rows("tiny", 2))
    with pytest.raises(LorafuseError) as err:
        load_tasks(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: task 'tiny' has only 2 unique prompts")
    assert "--split all" in message and "\n" not in message


def test_unknown_split_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", rows("a", 2, split="train") + rows("a", 1, split="dev"))
    with pytest.raises(LorafuseError, match=r"t.jsonl: line 3: unknown split 'dev'"):
        load_tasks(str(path))


def test_some_lines_without_split_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", rows("a", 2, split="test") + rows("b", 1))
    with pytest.raises(LorafuseError, match=r'line 3: no "split" field, but line 1 has one'):
        load_tasks(str(path))


def test_user_splits_are_kept(tmp_path: Path) -> None:
    data = [{**r, "split": s} for s in SPLITS for r in rows(s, 2)]
    suite = load_tasks(str(write(tmp_path / "t.jsonl", data)))
    assert {s: [ex.task for ex in suite.get(s)] for s in SPLITS} == {s: [s, s] for s in SPLITS}


def test_all_lines_keeps_every_line_in_order(tmp_path: Path) -> None:
    data = rows("x", 2) + rows("x", 2) + rows("y", 1)  # duplicates kept
    path = write(tmp_path / "t.jsonl", [{k: v for k, v in r.items() if k != "split"} for r in data])
    suite = load_tasks(str(path), all_lines=True)
    assert list(suite.splits) == [ALL] and suite.tasks == ["x", "y"]
    assert [ex.prompt for ex in suite.get(ALL)] == [r["prompt"] for r in data]


def test_builtin_all_is_every_split() -> None:
    sizes = {"train": 2, "val": 1, "test": 1}
    split = load_tasks("builtin", sizes=sizes)
    whole = load_tasks("builtin", sizes=sizes, all_lines=True).get(ALL)
    assert whole == [ex for s in SPLITS for ex in split.get(s)]
