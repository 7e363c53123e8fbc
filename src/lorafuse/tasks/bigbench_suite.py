"""Rebuild a named BIG-bench suite file (``data/bigbench48.json``) from the sdist.

    python -m lorafuse.tasks.bigbench_suite            # writes src/lorafuse/data/bigbench48.json

One pass over every JSON task of the archive: English tasks with at least ``min_usable``
raw examples are converted (``convert_task``, cached as JSONL exactly as ``--tasks`` loads
them), their usable examples counted and their mean prompt length measured; then the suite
rule (``SUITE_RULE``, ``select_suite``) picks the tasks. The rule, the limits, the split
sizes and every selected task's statistics are written into the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from lorafuse.tasks.bigbench import (
    SDIST,
    SUITE_RULE,
    SUITES_DIR,
    Limits,
    TaskStats,
    bigbench_source,
    cache_examples,
    convert_task,
    family_of,
    is_english,
    is_generative,
    iter_task_files,
    select_suite,
    smollm2_token_counter,
)

SUITE_LIMITS = Limits(max_prompt_tokens=128, max_answer_tokens=16, max_examples=3000)
# Per task: enough to train a small expert and score it; across 48 tasks the mean has a
# standard error of about a point, and the library builds in about an hour on two CPU cores.
SUITE_SIZES = {"train": 64, "val": 16, "test": 32}


def task_stats(source: Path, limits: Limits, count_tokens, min_usable: int) -> list[TaskStats]:
    """Statistics of every English task with at least ``min_usable`` raw examples."""
    stats: list[TaskStats] = []
    for name, data in tqdm(iter_task_files(source), desc="BIG-bench tasks", unit="task"):
        raw = data.get("examples") or []
        if not is_english(data) or len(raw) < min_usable:
            continue
        examples = convert_task(name, data, count_tokens, limits)
        cache_examples(name, examples, limits)
        lengths, _ = count_tokens([e.prompt for e in examples], [e.answer for e in examples])
        mean = sum(lengths) / len(lengths) if lengths else 0.0
        stats.append(TaskStats(name, len(examples), True, is_generative(data), round(mean, 2)))
    return stats


def suite_document(
    name: str,
    picked: list[TaskStats],
    *,
    k: int,
    min_usable: int,
    max_per_family: int,
    limits: Limits,
    sizes: dict[str, int],
) -> dict:
    rule = SUITE_RULE.format(
        min_usable=min_usable, max_per_family=max_per_family, k=k, **limits.__dict__
    )
    return {
        "name": name,
        "source": SDIST,
        "rule": rule,
        "rebuild": "python -m lorafuse.tasks.bigbench_suite",
        "limits": limits.__dict__,
        "sizes": sizes,
        "families": len({family_of(s.name) for s in picked}),
        "generative": sum(s.generative for s in picked),
        "tasks": [
            {
                "name": s.name,
                "family": family_of(s.name),
                "kind": "generative" if s.generative else "multiple_choice",
                "usable": s.usable,
                "mean_prompt_tokens": s.mean_prompt,
            }
            for s in picked
        ],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=48)
    parser.add_argument("--min-usable", type=int, default=300)
    parser.add_argument("--max-per-family", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default: data/bigbench{k}.json")
    args = parser.parse_args(argv)
    from lorafuse.io import atomic_write_text

    stats = task_stats(bigbench_source(), SUITE_LIMITS, smollm2_token_counter(), args.min_usable)
    picked = select_suite(
        stats, k=args.k, min_usable=args.min_usable, max_per_family=args.max_per_family
    )
    name = f"bigbench{args.k}"
    doc = suite_document(
        name,
        picked,
        k=args.k,
        min_usable=args.min_usable,
        max_per_family=args.max_per_family,
        limits=SUITE_LIMITS,
        sizes=SUITE_SIZES,
    )
    out = args.out or SUITES_DIR / f"{name}.json"
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    print(
        f"{out}: {len(picked)} tasks, {doc['families']} families, "
        f"{doc['generative']} generative (of {len(stats)} candidates)"
    )


if __name__ == "__main__":
    main()
