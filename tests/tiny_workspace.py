"""A workspace on the tiny Llama for builder tests: a character tokenizer, three toy tasks whose
prompts differ from the first character on (so a router can tell them apart), and a library of
the three tiny experts, one per task."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

from lorafuse.library.create import create_library
from lorafuse.workspace import Workspace, open_workspace

TASKS = ("add", "rev", "up")
NAMES = ("e_add", "e_rev", "e_up")
WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "hat", "box", "jam", "log", "fig", "owl"]


class CharTokenizer:
    """One token per character (ids 3..122); no chat template, end of turn = eos (1)."""

    pad_token_id, eos_token_id, unk_token_id = 0, 1, 2
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[3 + ord(c) % 120 for c in text])

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id


def _row(task: str, word: str, split: str) -> dict:
    prompt = {"add": f"+++ {word} plus one", "rev": f"<<< {word} reversed", "up": f"^^^ {word}!"}
    answer = {"add": word + "s", "rev": word[::-1], "up": word.upper()}
    return {"task": task, "prompt": prompt[task], "answer": answer[task], "split": split}


def task_file(path: Path, per_split: tuple[int, int, int] = (8, 4, 4)) -> Path:
    """``per_split`` (train, val, test) examples of each task, words not shared across
    splits."""
    rows = []
    for task in TASKS:
        start = 0
        for split, n in zip(("train", "val", "test"), per_split, strict=True):
            words = [WORDS[j % len(WORDS)] + str(j // len(WORDS)) for j in range(start, start + n)]
            rows += [_row(task, w, split) for w in words]
            start += n
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_workspace(
    tiny_base, tiny_experts, root: Path, per_split: tuple[int, int, int] = (8, 4, 4)
) -> Workspace:
    """The three tiny experts as a library (one per task) on the toy tasks."""
    base = dataclasses.replace(tiny_base, tokenizer=CharTokenizer())
    lib = root / "lib"
    create_library(lib, [a.path for a in tiny_experts], names=list(NAMES), tasks=list(TASKS))
    tasks = task_file(root / "tasks.jsonl", per_split)
    return open_workspace(library=lib, tasks=str(tasks), base=base)
