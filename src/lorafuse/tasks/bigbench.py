"""BIG-bench JSON tasks, read offline from the ``bigbench==1.0.0`` source distribution.

The sdist (about 360 MB) is fetched once with ``pip download --no-deps`` into the lorafuse
cache and never built or imported: the ``bigbench/benchmark_tasks/**/task.json`` members are
read straight from the archive (or from ``--bigbench-dir``, a BIG-bench checkout).

Conversion of one JSON task to ``{task, prompt, answer}`` examples (``convert_task``):

- the prompt is ``task_prefix + input`` (whitespace-stripped at both ends);
- generative examples (``target``: a string or a list) answer with the first target;
- multiple-choice examples (``target_scores``) list every option after the input, each on
  its own line as ``choice_prefix + option`` (BIG-bench's default ``"\\n  choice: "``), in
  an order shuffled by a hash of the task name and input (so the answer's position carries
  no signal), and answer with the text of the highest-scoring option (the first of ties);
- examples whose chat-formatted prompt is longer than ``max_prompt_tokens`` or whose answer
  is longer than ``max_answer_tokens`` (SmolLM2 tokenizer, whatever the base model: the suite
  is the same for every model) are dropped, then duplicates by prompt (the first is kept).

Task names are the task's folder below ``benchmark_tasks`` with ``/`` replaced by ``.``
(``arithmetic.2_digit_addition``), so a name is also a valid directory name.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorafuse.errors import LorafuseError
from lorafuse.tasks.example import Example

SDIST = "bigbench==1.0.0"
ARCHIVE_NAME = "bigbench-1.0.0.tar.gz"
TASKS_DIR = "bigbench/benchmark_tasks/"
DEFAULT_CHOICE_PREFIX = "\n  choice: "
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class Limits:
    """What makes an example usable (recorded with every converted task)."""

    max_prompt_tokens: int = 96
    max_answer_tokens: int = 16
    max_examples: int = 3000  # unique prompts considered per task, in file order


def task_name(relative: str) -> str:
    """A folder below benchmark_tasks (``a/b``) -> a task name (``a.b``)."""
    return relative.strip("/").replace("/", ".")


def family_of(name: str) -> str:
    return name.split(".")[0]


SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
INDEX = "https://pypi.org/simple"


def download_sdist(cache: Path) -> Path:
    """The sdist in ``cache``: fetched once from the package index, hash-checked, never built.

    The file's address comes from the index's JSON API (PEP 691; ``$PIP_INDEX_URL`` if set).
    ``pip download --no-deps`` would do the same, but recent pips prepare the sdist's
    metadata first, and bigbench's declares a direct-URL dependency that pip refuses.
    """
    import hashlib
    import os
    import urllib.request

    archive = cache / ARCHIVE_NAME
    if archive.is_file():
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    print(f"lorafuse: downloading {SDIST} source distribution (~360 MB) once into {cache} ...")
    index = os.environ.get("PIP_INDEX_URL", INDEX).rstrip("/")
    partial = archive.with_suffix(f".part{os.getpid()}")
    try:
        request = urllib.request.Request(
            f"{index}/bigbench/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            files = json.load(answer)["files"]
        url = next(f["url"] for f in files if f["filename"] == ARCHIVE_NAME)
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=180) as answer, open(partial, "wb") as out:
            while chunk := answer.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != SDIST_SHA256:
            raise OSError(f"sha256 {digest.hexdigest()} is not the pinned {SDIST_SHA256}")
        os.replace(partial, archive)
    except (OSError, ValueError, KeyError, StopIteration) as err:
        raise LorafuseError(f"cannot download {SDIST} from {index} ({err})", cache) from None
    finally:
        partial.unlink(missing_ok=True)
    return archive


def iter_task_files(source: Path, wanted: set[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(task name, parsed task.json) for every JSON task in an sdist archive or a checkout."""
    if source.is_dir():
        root = source / "bigbench" / "benchmark_tasks"
        root = root if root.is_dir() else source
        for file in sorted(root.rglob("task.json")):
            name = task_name(str(file.parent.relative_to(root)))
            if wanted is None or name in wanted:
                yield name, _parse(file.read_bytes(), file)
        return
    if not source.is_file():
        raise LorafuseError("BIG-bench source not found (an sdist .tar.gz or a checkout)", source)
    try:
        with tarfile.open(source) as archive:
            for member in archive:
                if not (member.isfile() and member.name.endswith("/task.json")):
                    continue
                rel = member.name.split(TASKS_DIR, 1)
                if len(rel) != 2:
                    continue
                name = task_name(rel[1][: -len("/task.json")])
                if wanted is None or name in wanted:
                    handle = archive.extractfile(member)
                    yield name, _parse(handle.read(), f"{source}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise LorafuseError(f"cannot read the BIG-bench archive ({err})", source) from None


def _parse(raw: bytes, where) -> dict:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LorafuseError(f"invalid task JSON ({err})", where) from None
    if not isinstance(data, dict):
        raise LorafuseError("a task.json must hold an object", where)
    return data


def convert_example(name: str, data: dict, example: dict) -> Example | None:
    """One BIG-bench example as ``{task, prompt, answer}`` (None if it has no usable target)."""
    inp = example.get("input")
    if not isinstance(inp, str):
        return None
    prompt = f"{data.get('task_prefix', '') or ''}{inp}"
    scores = example.get("target_scores")
    if isinstance(scores, dict) and scores:
        options = [str(o) for o in scores]
        best = max(scores.values())
        answer = next(str(o) for o, s in scores.items() if s == best)
        random.Random(f"{name}\n{inp}").shuffle(options)
        choice = data.get("choice_prefix") or DEFAULT_CHOICE_PREFIX
        prompt = prompt.rstrip() + "".join(f"{choice}{o}" for o in options)
    else:
        target = example.get("target")
        if isinstance(target, list):
            target = next((t for t in target if isinstance(t, str) and t.strip()), None)
        if not isinstance(target, str):
            return None
        answer = target
    prompt, answer = prompt.strip(), answer.strip()
    if not prompt or not answer:
        return None
    return Example(name, prompt, answer)


def is_generative(data: dict) -> bool:
    """Most examples answer with a ``target`` rather than ``target_scores``."""
    examples = data.get("examples") or []
    mc = sum(1 for e in examples if isinstance(e, dict) and e.get("target_scores"))
    return mc * 2 < len(examples)


def convert_task(name: str, data: dict, count_tokens, limits: Limits) -> list[Example]:
    """Every usable example of one task, in file order, duplicates by prompt dropped.

    ``count_tokens(prompts, answers) -> (prompt_lengths, answer_lengths)``.
    """
    first: dict[str, Example] = {}
    for raw in data.get("examples") or []:
        ex = convert_example(name, data, raw) if isinstance(raw, dict) else None
        if ex is not None and ex.prompt not in first:
            first[ex.prompt] = ex
            if len(first) >= limits.max_examples:
                break
    unique = list(first.values())
    if not unique:
        return []
    p_len, a_len = count_tokens([e.prompt for e in unique], [e.answer for e in unique])
    return [
        ex
        for ex, p, a in zip(unique, p_len, a_len, strict=True)
        if p <= limits.max_prompt_tokens and a <= limits.max_answer_tokens
    ]


def smollm2_token_counter():
    """Token counts with the embedded SmolLM2 tokenizer: chat-formatted prompt, bare answer."""
    from transformers import AutoTokenizer

    from lorafuse.core.encode import prompt_text
    from lorafuse.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())

    def count(prompts: Sequence[str], answers: Sequence[str]) -> tuple[list[int], list[int]]:
        if not prompts:
            return [], []
        texts = [prompt_text(tok, p) for p in prompts]
        p = tok(texts, add_special_tokens=False).input_ids
        a = tok(list(answers), add_special_tokens=False).input_ids
        return [len(x) for x in p], [len(x) for x in a]

    return count


EXCLUDED_KEYWORDS = frozenset(
    {"non-English", "multilingual", "translation", "low-resource language"}
)


def is_english(data: dict) -> bool:
    """BIG-bench's own keywords mark tasks that are not (only) English."""
    return not EXCLUDED_KEYWORDS.intersection(data.get("keywords") or [])


SUITE_RULE = (
    "English JSON tasks of bigbench==1.0.0 (none of the keywords non-English, multilingual, "
    "translation, low-resource language) with at least {min_usable} usable examples after "
    "conversion (prompt <= {max_prompt_tokens} chat tokens, answer <= {max_answer_tokens} "
    "tokens, de-duplicated, first {max_examples} unique prompts in file order); a family is "
    "the top folder below benchmark_tasks; within a family tasks are ranked by mean prompt "
    "tokens (then name) and at most {max_per_family} are kept; candidates are every family's "
    "first task by ascending mean prompt tokens, then every family's second task the same "
    "way; the first {k} are the suite."
)


@dataclass(frozen=True)
class TaskStats:
    name: str
    usable: int
    english: bool
    generative: bool
    mean_prompt: float


def select_suite(
    stats: Sequence[TaskStats], *, k: int = 48, min_usable: int = 300, max_per_family: int = 2
) -> list[TaskStats]:
    """The suite rule (``SUITE_RULE``): deterministic given the stats."""
    by_family: dict[str, list[TaskStats]] = {}
    for s in stats:
        if s.english and s.usable >= min_usable:
            by_family.setdefault(family_of(s.name), []).append(s)
    ranked = {f: sorted(v, key=lambda s: (s.mean_prompt, s.name)) for f, v in by_family.items()}
    candidates: list[TaskStats] = []
    for round_ in range(max_per_family):
        level = [v[round_] for v in ranked.values() if len(v) > round_]
        candidates += sorted(level, key=lambda s: (s.mean_prompt, s.name))
    return candidates[:k]


SUITES_DIR = Path(__file__).resolve().parent.parent / "data"
SOURCE_ENV = "LORAFUSE_BIGBENCH_DIR"  # set by ``lorafuse --bigbench-dir DIR``


def bigbench_source() -> Path:
    """``$LORAFUSE_BIGBENCH_DIR`` (a checkout or an sdist), else the cached sdist."""
    import os

    from lorafuse.models import cache_root

    given = os.environ.get(SOURCE_ENV)
    return Path(given) if given else download_sdist(cache_root() / "bigbench")


def read_suite(name: str) -> dict:
    """A named suite file (``data/NAME.json``): tasks, limits, split sizes and the rule."""
    file = SUITES_DIR / f"{name}.json"
    if not file.is_file():
        raise LorafuseError(f"unknown BIG-bench suite '{name}'", file)
    return json.loads(file.read_text())


def converted_folder(limits: Limits) -> Path:
    from lorafuse.models import cache_root

    tag = f"v{CONVERTER_VERSION}-p{limits.max_prompt_tokens}-a{limits.max_answer_tokens}"
    return cache_root() / "bigbench" / f"converted-{tag}-n{limits.max_examples}"


def cache_examples(name: str, examples: Sequence[Example], limits: Limits) -> None:
    from lorafuse.io import atomic_write_text

    rows = "".join(json.dumps(ex.__dict__) + "\n" for ex in examples)
    atomic_write_text(converted_folder(limits) / f"{name}.jsonl", rows)


def converted_examples(
    names: Sequence[str], limits: Limits, source: Path | None = None, count_tokens=None
) -> dict[str, list[Example]]:
    """Usable examples per task, converted once and cached as JSONL in the lorafuse cache."""
    folder = converted_folder(limits)
    out: dict[str, list[Example]] = {}
    for name in names:
        file = folder / f"{name}.jsonl"
        if file.is_file():
            rows = [json.loads(line) for line in file.read_text().splitlines() if line]
            out[name] = [Example(r["task"], r["prompt"], r["answer"]) for r in rows]
    missing = [n for n in names if n not in out]
    if missing:
        count_tokens = count_tokens or smollm2_token_counter()
        source = source or bigbench_source()
        for name, data in iter_task_files(source, set(missing)):
            out[name] = convert_task(name, data, count_tokens, limits)
            cache_examples(name, out[name], limits)
        absent = [n for n in missing if n not in out]
        if absent:
            raise LorafuseError(f"no such BIG-bench JSON task(s): {', '.join(absent)}", source)
    return {n: out[n] for n in names}


def parse_spec(spec: str) -> tuple[list[str], Limits, dict[str, int] | None]:
    """``bigbench48`` (a named suite) or ``bigbench:TASK,TASK`` -> names, limits, sizes."""
    if spec.startswith("bigbench:"):
        names = [task_name(n) for n in spec.split(":", 1)[1].split(",") if n.strip()]
        if not names:
            raise LorafuseError(f"--tasks {spec}: name at least one BIG-bench task")
        return names, Limits(), None
    suite = read_suite(spec)
    return [t["name"] for t in suite["tasks"]], Limits(**suite["limits"]), suite["sizes"]


def is_bigbench_spec(spec: str) -> bool:
    return spec.startswith("bigbench:") or (
        spec.startswith("bigbench") and (SUITES_DIR / f"{spec}.json").is_file()
    )


DEFAULT_SIZES = {"train": 200, "val": 50, "test": 50}


def load_bigbench(spec: str, *, seed: int = 0, sizes: dict[str, int] | None = None):
    """A BIG-bench suite split per task by seed (sizes: the suite's, else ``DEFAULT_SIZES``)."""
    from lorafuse.tasks.example import split_per_task

    names, limits, suite_sizes = parse_spec(spec)
    examples = converted_examples(names, limits)
    empty = [n for n in names if not examples[n]]
    if empty:
        raise LorafuseError(f"--tasks {spec}: no usable examples in {', '.join(empty)}")
    flat = [ex for n in names for ex in examples[n]]
    return split_per_task(flat, sizes=dict(sizes or suite_sizes or DEFAULT_SIZES), seed=seed)
