"""Examples, splits and the JSONL task format (``{"task", "prompt", "answer"}`` per line)."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_write_text

SPLITS = ("train", "val", "test")
ALL = "all"  # every line of a task file, unsplit (``lorafuse eval --split all``)


@dataclass(frozen=True)
class Example:
    """One prompt with its short reference answer."""

    task: str
    prompt: str
    answer: str


@dataclass
class TaskSuite:
    """Examples per split; ``splits[split]`` keeps the order the examples were made in."""

    splits: dict[str, list[Example]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        """Task names in first-seen order over all splits."""
        seen: dict[str, None] = {}
        for split in (*SPLITS, ALL):
            for ex in self.splits.get(split, []):
                seen.setdefault(ex.task)
        return list(seen)

    def get(self, split: str, tasks: Sequence[str] | None = None) -> list[Example]:
        """Examples of one split, optionally restricted to some tasks."""
        if split not in self.splits:
            raise LorafuseError(f"no '{split}' split (have: {', '.join(self.splits)})")
        wanted = set(tasks) if tasks is not None else None
        return [ex for ex in self.splits[split] if wanted is None or ex.task in wanted]

    def by_task(self, split: str) -> dict[str, list[Example]]:
        out: dict[str, list[Example]] = defaultdict(list)
        for ex in self.get(split):
            out[ex.task].append(ex)
        return dict(out)


def split_examples(
    examples: Sequence[Example],
    sizes: dict[str, int],
    seed: int,
    source: str | Path | None = None,
) -> dict[str, list[Example]]:
    """Shuffle one task's examples by seed and cut disjoint splits of the given sizes.

    Duplicates (same prompt) are dropped first so that no test prompt is seen in training.
    ``source`` (the task file) is named in errors.
    """
    unique = list({ex.prompt: ex for ex in examples}.values())
    random.Random(seed).shuffle(unique)
    need = sum(sizes.values())
    if len(unique) < need:
        task = examples[0].task if examples else "?"
        raise LorafuseError(
            f"task {task!r} has {len(unique)} unique prompts, {need} needed to split", source
        )
    out, start = {}, 0
    for split, n in sizes.items():
        out[split] = unique[start : start + n]
        start += n
    return out


def load_jsonl(path: str | Path) -> list[Example]:
    """Read ``{"task", "prompt", "answer"}`` lines; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise LorafuseError("task file not found", path)
    examples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LorafuseError(f"line {lineno}: invalid JSON ({err.msg})", path) from None
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) and row.get(k) for k in ("task", "prompt", "answer")
        ):
            raise LorafuseError(
                f"line {lineno}: need non-empty string fields task, prompt, answer", path
            )
        examples.append(Example(row["task"], row["prompt"], row["answer"]))
    if not examples:
        raise LorafuseError("no examples", path)
    return examples


def save_jsonl(path: str | Path, examples: Iterable[Example]) -> None:
    atomic_write_text(path, "".join(json.dumps(asdict(ex)) + "\n" for ex in examples))


def load_tasks(
    spec: str,
    *,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    all_lines: bool = False,
) -> TaskSuite:
    """``"builtin"``, a BIG-bench suite (``bigbench48``, ``bigbench:TASK,...``), or a JSONL
    path split per task by seed.

    A JSONL file with a ``split`` field (train, val or test) on every line keeps the user's
    splits instead. ``all_lines`` skips splitting: one split ``"all"`` with every line of the
    file in order (every example of the built-in suite).
    """
    from lorafuse.tasks.bigbench import is_bigbench_spec, load_bigbench
    from lorafuse.tasks.builtin import DEFAULT_SIZES, builtin_suite

    if is_bigbench_spec(spec):
        return load_bigbench(spec, seed=seed, sizes=sizes)
    sizes = dict(sizes or DEFAULT_SIZES)
    if spec == "builtin":
        suite = builtin_suite(seed=seed, sizes=sizes)
        if all_lines:
            return TaskSuite({ALL: [ex for s in SPLITS for ex in suite.splits.get(s, [])]})
        return suite
    path = Path(spec)
    examples = load_jsonl(path)  # validates first: bad lines are LorafuseErrors, not tracebacks
    labels = split_labels(path)
    if all_lines:
        return TaskSuite({ALL: examples})
    if labels:
        splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for label, ex in zip(labels, examples, strict=True):
            splits[label].append(ex)
        return TaskSuite(splits)
    return split_per_task(examples, sizes=sizes, seed=seed, source=path)


def split_labels(path: Path) -> list[str] | None:
    """Each line's ``split`` field, or None when no line has one; a split other than train,
    val or test, or a file where only some lines have one, is an error naming the line."""
    labels: list[tuple[int, str | None]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            labels.append((lineno, json.loads(line).get("split")))
    with_split = [(n, s) for n, s in labels if s is not None]
    if not with_split:
        return None
    for lineno, split in with_split:
        if split not in SPLITS:
            raise LorafuseError(
                f"line {lineno}: unknown split {split!r} (use {', '.join(SPLITS)}, "
                "or leave out the field on every line to split by task)",
                path,
            )
    if len(with_split) < len(labels):
        missing = next(n for n, s in labels if s is None)
        raise LorafuseError(
            f'line {missing}: no "split" field, but line {with_split[0][0]} has one '
            "(give every line a split, or none)",
            path,
        )
    return [s for _, s in labels]  # type: ignore[misc]


def split_per_task(
    examples: Sequence[Example],
    *,
    sizes: dict[str, int],
    seed: int,
    source: str | Path | None = None,
) -> TaskSuite:
    """Split each task by proportion when it is smaller than ``sizes`` asks for.

    ``source`` (the task file) is named in errors.
    """
    grouped: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        grouped[ex.task].append(ex)
    splits: dict[str, list[Example]] = {s: [] for s in sizes}
    for i, (task, exs) in enumerate(grouped.items()):
        n_unique = len({ex.prompt for ex in exs})
        total = sum(sizes.values())
        scaled = sizes if n_unique >= total else _scale_sizes(sizes, n_unique, task, source)
        for split, part in split_examples(exs, scaled, seed + 1000 * i, source).items():
            splits[split].extend(part)
    return TaskSuite(splits)


def _scale_sizes(
    sizes: dict[str, int], n: int, task: str, source: str | Path | None
) -> dict[str, int]:
    total = sum(sizes.values())
    scaled = {k: max(1, v * n // total) for k, v in sizes.items()}
    first = next(iter(scaled))
    scaled[first] = n - sum(v for k, v in scaled.items() if k != first)
    if scaled[first] < 1:
        raise LorafuseError(
            f"task {task!r} has only {n} unique prompts: too few to split into "
            f"{', '.join(sizes)} (need {len(sizes)}; to score every line, use --split all)",
            source,
        )
    return scaled
