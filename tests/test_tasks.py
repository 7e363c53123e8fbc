"""lorafuse.tasks: the built-in suite, splits, and the JSONL task format."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lorafuse.errors import LorafuseError
from lorafuse.tasks import (
    BUILTIN_TASKS,
    Example,
    TaskSuite,
    builtin_suite,
    load_jsonl,
    load_tasks,
    save_jsonl,
)
from lorafuse.tasks.builtin import BBC_LABELS, bbc_topic_examples, word_list

SIZES = {"train": 20, "val": 5, "test": 5}
GENERATED = tuple(t for t in BUILTIN_TASKS if t != "bbc_topic")


@pytest.fixture(scope="module")
def suite() -> TaskSuite:
    return builtin_suite(seed=0, sizes=SIZES)


def test_all_builtin_tasks_present(suite: TaskSuite) -> None:
    assert len(BUILTIN_TASKS) == 8
    assert set(BUILTIN_TASKS) == {
        "larger", "smaller", "successor", "predecessor",
        "extract_number", "sentiment", "first_letter", "bbc_topic",
    }  # fmt: skip
    assert suite.tasks == list(BUILTIN_TASKS)
    for split in SIZES:
        assert set(suite.by_task(split)) == set(BUILTIN_TASKS)


def test_split_sizes_match(suite: TaskSuite) -> None:
    assert set(suite.splits) == set(SIZES)
    for split, n in SIZES.items():
        counts = Counter(ex.task for ex in suite.get(split))
        assert counts == dict.fromkeys(BUILTIN_TASKS, n), split


def test_splits_disjoint_by_prompt_within_task(suite: TaskSuite) -> None:
    for task in BUILTIN_TASKS:
        prompts = {s: [ex.prompt for ex in suite.get(s, [task])] for s in SIZES}
        for s, ps in prompts.items():
            assert len(set(ps)) == len(ps), f"{task}/{s} has duplicate prompts"
        assert not set(prompts["train"]) & set(prompts["val"])
        assert not set(prompts["train"]) & set(prompts["test"])
        assert not set(prompts["val"]) & set(prompts["test"])


def test_builtin_suite_deterministic_by_seed(suite: TaskSuite) -> None:
    again = builtin_suite(seed=0, sizes=SIZES)
    assert again.splits == suite.splits
    other = builtin_suite(seed=1, sizes=SIZES)
    for split in SIZES:
        assert other.get(split) != suite.get(split)
        # bbc_topic has a fixed pool of examples: a different seed still picks other ones
        assert other.get(split, ["bbc_topic"]) != suite.get(split, ["bbc_topic"])


def test_builtin_suite_task_subset_and_unknown_task() -> None:
    part = builtin_suite(seed=3, sizes=SIZES, tasks=["larger", "successor"])
    assert part.tasks == ["larger", "successor"]
    with pytest.raises(LorafuseError, match="unknown built-in task"):
        builtin_suite(seed=0, sizes=SIZES, tasks=["larger", "nope"])


def _expected_answer(ex: Example) -> str:
    """The answer recomputed from the prompt text alone."""
    numbers = [int(n) for n in re.findall(r"\d+", ex.prompt)]
    if ex.task == "larger":
        assert len(numbers) == 2 and numbers[0] != numbers[1]
        return str(max(numbers))
    if ex.task == "smaller":
        assert len(numbers) == 2 and numbers[0] != numbers[1]
        return str(min(numbers))
    if ex.task == "successor":
        assert ex.prompt.startswith("Which number comes right after")
        return str(numbers[0] + 1)
    if ex.task == "predecessor":
        assert ex.prompt.startswith("Which number comes right before")
        return str(numbers[0] - 1)
    if ex.task == "extract_number":
        assert len(numbers) == 1
        return str(numbers[0])
    if ex.task == "first_letter":
        word = re.fullmatch(r"What is the first letter of the word ([a-z]+)\?", ex.prompt)
        assert word is not None and word.group(1) in word_list()
        return word.group(1)[0]
    if ex.task == "sentiment":
        review = ex.prompt.split("? ", 1)[1]
        positive = {"wonderful", "excellent", "great", "lovely", "delightful"}
        positive |= {"superb", "amazing", "fantastic", "pleasant", "brilliant"}
        adjectives = re.findall(r"was (\w+)", review)
        assert len(adjectives) == 2
        kinds = {a in positive for a in adjectives}
        assert len(kinds) == 1, "both adjectives of a review share one polarity"
        return "positive" if kinds.pop() else "negative"
    raise AssertionError(ex.task)


@pytest.mark.parametrize("task", GENERATED)
def test_generated_answers_are_correct(suite: TaskSuite, task: str) -> None:
    examples = [ex for split in SIZES for ex in suite.get(split, [task])]
    assert len(examples) == sum(SIZES.values())
    for ex in examples:
        assert ex.answer == _expected_answer(ex), ex


def test_bbc_topic_labels_and_unique_prompts(suite: TaskSuite) -> None:
    labels = {"business", "entertainment", "politics", "sport", "tech"}
    assert set(BBC_LABELS.values()) == labels
    pool = bbc_topic_examples()
    assert len(pool) > 1000
    assert {ex.answer for ex in pool} == labels
    assert len({ex.prompt for ex in pool}) == len(pool)
    assert all(ex.task == "bbc_topic" for ex in pool)
    picked = [ex for s in SIZES for ex in suite.get(s, ["bbc_topic"])]
    assert {ex.answer for ex in picked} <= labels
    assert set(picked) <= set(pool)


# ------------------------------------------------------------------------------- JSONL


def _examples(task: str, n: int, offset: int = 0) -> list[Example]:
    return [Example(task, f"{task} prompt {i + offset}", f"ans{i}") for i in range(n)]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    examples = _examples("a", 3) + [Example("b", 'quote " and ünïcode\ttab', "x y")]
    path = tmp_path / "tasks.jsonl"
    save_jsonl(path, examples)
    assert load_jsonl(path) == examples
    assert len(path.read_text(encoding="utf-8").splitlines()) == 4


def test_jsonl_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    row = json.dumps({"task": "a", "prompt": "p", "answer": "x"})
    path.write_text(f"\n{row}\n   \n{row}\n", encoding="utf-8")
    assert load_jsonl(path) == [Example("a", "p", "x")] * 2


def _bad_file(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"task": "a", "prompt": "p", "answer": "x"})


@pytest.mark.parametrize(
    ("lines", "lineno", "keyword"),
    [
        ([GOOD, "{not json", GOOD], 2, "invalid JSON"),
        ([GOOD, GOOD, json.dumps({"task": "a", "prompt": "p"})], 3, "answer"),
        ([json.dumps({"task": "a", "prompt": "", "answer": "x"})], 1, "non-empty"),
        ([json.dumps({"task": "a", "prompt": "p", "answer": 3})], 1, "string"),
        ([GOOD, "[1, 2]"], 2, "task, prompt, answer"),
    ],
)
def test_bad_jsonl_names_file_and_line(
    tmp_path: Path, lines: list[str], lineno: int, keyword: str
) -> None:
    path = _bad_file(tmp_path, lines)
    for load in (load_jsonl, load_tasks):
        with pytest.raises(LorafuseError) as info:
            load(str(path))
        msg = str(info.value)
        assert str(path) in msg
        assert f"line {lineno}" in msg
        assert keyword in msg


def test_missing_and_empty_jsonl(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    for load in (load_jsonl, load_tasks):
        with pytest.raises(LorafuseError, match="not found") as info:
            load(str(missing))
        assert str(missing) in str(info.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(LorafuseError, match="no examples") as info:
        load_jsonl(empty)
    assert str(empty) in str(info.value)


def test_load_tasks_keeps_user_splits(tmp_path: Path) -> None:
    rows = []
    for i, split in enumerate(["test", "train", "val", "train", "test", "train"]):
        rows.append({"task": f"t{i % 2}", "prompt": f"p{i}", "answer": f"a{i}", "split": split})
    path = tmp_path / "split.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    suite = load_tasks(str(path), seed=5, sizes=SIZES)
    for split in ("train", "val", "test"):
        want = [Example(r["task"], r["prompt"], r["answer"]) for r in rows if r["split"] == split]
        assert suite.get(split) == want


def test_load_tasks_splits_per_task_by_seed(tmp_path: Path) -> None:
    """A big task gets exactly ``sizes``; a small one is scaled down in proportion."""
    sizes = {"train": 8, "val": 2, "test": 2}
    big, small = _examples("big", 20), _examples("small", 6)
    path = tmp_path / "t.jsonl"
    save_jsonl(path, big + small)
    suite = load_tasks(str(path), seed=0, sizes=sizes)
    assert {s: len(suite.get(s, ["big"])) for s in sizes} == sizes
    assert {s: len(suite.get(s, ["small"])) for s in sizes} == {"train": 4, "val": 1, "test": 1}
    for task, pool in (("big", big), ("small", small)):
        parts = [suite.get(s, [task]) for s in sizes]
        flat = [ex for part in parts for ex in part]
        assert len(set(flat)) == len(flat)  # disjoint
        assert set(flat) <= set(pool)
    small_parts = [suite.get(s, ["small"]) for s in sizes]
    assert set().union(*map(set, small_parts)) == set(small)  # small task fully used
    assert load_tasks(str(path), seed=0, sizes=sizes).splits == suite.splits
    assert load_tasks(str(path), seed=1, sizes=sizes).splits != suite.splits


def test_load_tasks_too_small_task(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    save_jsonl(path, _examples("tiny", 2))
    with pytest.raises(LorafuseError, match="too few"):
        load_tasks(str(path), seed=0, sizes={"train": 8, "val": 2, "test": 2})


def test_load_tasks_builtin_spec() -> None:
    suite = load_tasks("builtin", seed=0, sizes={"train": 3, "val": 1, "test": 1})
    assert suite.tasks == list(BUILTIN_TASKS)
    assert len(suite.get("train")) == 3 * len(BUILTIN_TASKS)
