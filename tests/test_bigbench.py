"""BIG-bench JSON tasks -> {task, prompt, answer}: exact prompts and answers on fixtures."""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest

from lorafuse.errors import LorafuseError
from lorafuse.tasks.bigbench import (
    Limits,
    TaskStats,
    convert_task,
    is_english,
    is_generative,
    iter_task_files,
    select_suite,
)

GENERATIVE = {
    "name": "fixture_gen",
    "task_prefix": "Answer the question.\n",
    "keywords": ["arithmetic"],
    "examples": [
        {"input": "What is 2 plus 3?", "target": ["5", "five"]},
        {"input": "What is 1 plus 1?", "target": "2"},
        {"input": "What is 2 plus 3?", "target": "6"},  # duplicate prompt: the first is kept
        {"input": "What is 9 plus 9?", "target": ""},  # no usable target
        {"input": "x " * 50, "target": "long prompt"},  # over the prompt limit
    ],
}
CHOICE = {
    "name": "fixture_mc",
    "keywords": ["multiple choice"],
    "choice_prefix": "\n  option: ",
    "examples": [
        {"input": "Is fire hot? ", "target_scores": {"yes": 1, "no": 0, "maybe": 0}},
        {"input": "Pick a tie.", "target_scores": {"a": 0, "b": 1, "c": 1}},
    ],
}


def word_counter(prompts, answers):
    """A stand-in tokenizer: whitespace words (the real one is SmolLM2's)."""
    return [len(p.split()) for p in prompts], [len(a.split()) for a in answers]


def test_generative_prompt_is_prefix_plus_input_and_first_target():
    exs = convert_task("fam.gen", GENERATIVE, word_counter, Limits(max_prompt_tokens=20))
    assert [(e.task, e.prompt, e.answer) for e in exs] == [
        ("fam.gen", "Answer the question.\nWhat is 2 plus 3?", "5"),
        ("fam.gen", "Answer the question.\nWhat is 1 plus 1?", "2"),
    ]
    assert is_generative(GENERATIVE) and not is_generative(CHOICE)


def test_choice_prompt_lists_options_in_seeded_order_and_answers_best():
    exs = convert_task("fam.mc", CHOICE, word_counter, Limits())
    order = ["yes", "no", "maybe"]
    random.Random("fam.mc\nIs fire hot? ").shuffle(order)  # the documented order rule
    assert exs[0].prompt == "Is fire hot?" + "".join(f"\n  option: {o}" for o in order)
    assert exs[0].answer == "yes"
    assert exs[1].answer == "b"  # the first of tied best options
    assert sorted(exs[1].prompt.split("\n  option: ")[1:]) == ["a", "b", "c"]


def test_answer_limit_drops_long_answers():
    data = {"examples": [{"input": "q", "target": "one two three"}, {"input": "r", "target": "a"}]}
    exs = convert_task("t", data, word_counter, Limits(max_answer_tokens=2))
    assert [e.answer for e in exs] == ["a"]


def test_reads_tasks_from_an_sdist_archive_and_a_checkout(tmp_path):
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for rel, data in [("fam/gen", GENERATIVE), ("mc", CHOICE)]:
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}/task.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    assert [n for n, _ in iter_task_files(archive)] == ["fam.gen", "mc"]
    assert [n for n, _ in iter_task_files(archive, {"mc"})] == ["mc"]
    checkout = tmp_path / "checkout" / "bigbench" / "benchmark_tasks" / "fam" / "gen"
    checkout.mkdir(parents=True)
    (checkout / "task.json").write_text(json.dumps(GENERATIVE))
    assert [n for n, _ in iter_task_files(tmp_path / "checkout")] == ["fam.gen"]


def test_unreadable_sources_are_one_line_errors(tmp_path):
    with pytest.raises(LorafuseError, match="not found"):
        list(iter_task_files(tmp_path / "absent.tar.gz"))
    bad = tmp_path / "t" / "task.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(LorafuseError, match="invalid task JSON"):
        list(iter_task_files(tmp_path))


def test_english_rule_reads_keywords():
    assert is_english({"keywords": ["logic"]})
    assert not is_english({"keywords": ["logic", "non-English"]})


def test_suite_rule_is_deterministic_and_keeps_two_per_family():
    stats = [
        TaskStats("a.x", 400, True, True, 30.0),
        TaskStats("a.y", 400, True, False, 20.0),
        TaskStats("a.z", 400, True, False, 10.0),  # third of family a: never picked
        TaskStats("b", 500, True, False, 25.0),
        TaskStats("c", 299, True, True, 5.0),  # too few usable examples
        TaskStats("d", 900, False, True, 5.0),  # not English
        TaskStats("e.1", 300, True, True, 40.0),
    ]
    picked = [s.name for s in select_suite(stats, k=10)]
    # round 1 (each family's shortest), by mean prompt; then round 2
    assert picked == ["a.z", "b", "e.1", "a.y"]
    assert [s.name for s in select_suite(list(reversed(stats)), k=3)] == picked[:3]
