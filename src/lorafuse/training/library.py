"""Train a library: one private expert per task plus a multi-task adapter, resumable.

The manifest is rewritten after every expert, so an interrupted run picks up where it
stopped (finished experts are kept, a half-trained one resumes from its checkpoint).
:mod:`lorafuse.training.distributed` runs the same jobs as Ray tasks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from lorafuse.core.encode import Encoded, encode_examples
from lorafuse.core.states import StateCache
from lorafuse.errors import LorafuseError
from lorafuse.fingerprint import Stamp, refuse_mismatch
from lorafuse.io import atomic_write_text
from lorafuse.library import ExpertEntry, LibraryManifest, new_manifest, write_manifest
from lorafuse.library.manifest import MANIFEST_NAME, read_manifest
from lorafuse.models import BaseModel
from lorafuse.tasks.example import TaskSuite
from lorafuse.training.config import TrainConfig
from lorafuse.training.train import split_layer, train_adapter

MULTITASK = "multitask"


@dataclass(frozen=True)
class ExpertJob:
    """One expert to train: its name, the tasks of its data, its kind and its settings."""

    name: str
    tasks: tuple[str, ...]
    kind: str
    config: TrainConfig


@dataclass(frozen=True)
class JobData:
    """A job's encoded training examples, and each of its tasks' examples on their own
    (the groups the lower-layer states are computed in; see :func:`train_expert`)."""

    encoded: list[Encoded]
    by_task: dict[str, list[Encoded]]


def library_jobs(
    tasks: Sequence[str], config: TrainConfig, multitask_steps: int | None = None
) -> list[ExpertJob]:
    """A private expert per task, then the multi-task adapter (``2 x steps`` by default)."""
    jobs = [ExpertJob(t, (t,), "private", config) for t in tasks]
    mt_config = config.model_copy(update={"steps": multitask_steps or 2 * config.steps})
    jobs.append(ExpertJob(MULTITASK, tuple(tasks), MULTITASK, mt_config))
    return jobs


def job_data(base: BaseModel, suite: TaskSuite, job: ExpertJob) -> JobData:
    by_task = {t: encode_examples(base.tokenizer, suite.get("train", [t])) for t in job.tasks}
    encoded = encode_examples(base.tokenizer, suite.get("train", list(job.tasks)))
    return JobData(encoded, by_task)


def train_expert(
    base: BaseModel,
    data: JobData,
    cache: StateCache,
    job: ExpertJob,
    out_dir: Path,
    *,
    progress: bool = True,
) -> ExpertEntry:
    """Train one job's expert into ``out_dir/experts/NAME`` (atomically) with its card.

    States are computed task by task first, as a serial run computes them (a private
    expert's task, then the multi-task adapter finds them all cached): the lower-layer
    forward batches by length, so computing a union at once could round differently,
    and a distributed run would no longer equal the serial one bit for bit.
    """
    for name, encoded in data.by_task.items():
        cache.get(encoded, desc=f"{name}: states")
    rel = f"experts/{job.name}"
    started = time.perf_counter()
    result = train_adapter(
        base, data.encoded, cache, job.config, out_dir / rel, desc=f"train {job.name}",
        progress=progress,
    )  # fmt: skip
    entry = ExpertEntry(
        name=job.name,
        path=rel,
        tasks=list(job.tasks),
        kind=job.kind,
        train={**job.config.model_dump(), "n_train": len(data.encoded)},
        metrics={
            "train_time_s": round(result.train_time_s, 1),
            "wall_time_s": round(time.perf_counter() - started, 1),
            "final_train_loss": round(sum(result.losses[-10:]) / len(result.losses[-10:]), 4),
        },
    )
    write_expert_card(out_dir / rel, entry, base.name)
    return entry


def record_expert(
    out_dir: Path, manifest: LibraryManifest, entry: ExpertEntry, jobs: Sequence[ExpertJob]
) -> None:
    """Add (or replace) ``entry`` in the manifest, experts in job order, and rewrite it."""
    order = {job.name: i for i, job in enumerate(jobs)}
    experts = [e for e in manifest.experts if e.name != entry.name] + [entry]
    manifest.experts = sorted(experts, key=lambda e: order.get(e.name, len(order)))
    write_manifest(out_dir, manifest)


def pending_jobs(
    out_dir: Path, manifest: LibraryManifest, jobs: Sequence[ExpertJob]
) -> list[ExpertJob]:
    """The jobs whose expert is not in the manifest with its folder on disk."""
    done = {e.name for e in manifest.experts if (out_dir / e.path).is_dir()}
    return [job for job in jobs if job.name not in done]


def train_library(
    base: BaseModel,
    suite: TaskSuite,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    multitask_steps: int | None = None,
    tasks: Sequence[str] | None = None,
    extra_config: dict | None = None,
    progress: bool = True,
    cache: StateCache | None = None,
) -> LibraryManifest:
    """Train private experts (one per task) and a multi-task adapter into ``out_dir``."""
    out_dir = Path(out_dir)
    tasks = list(tasks or suite.tasks)
    jobs = library_jobs(tasks, config, multitask_steps)
    cache = cache or StateCache(base, split_layer(base.model, config.top_layers), progress=progress)
    manifest = resume_manifest(out_dir, base, suite, tasks, config, extra_config)
    todo = pending_jobs(out_dir, manifest, jobs)
    bar = tqdm(
        total=len(jobs),
        initial=len(jobs) - len(todo),
        desc="library",
        unit="expert",
        disable=not progress,
    )
    for job in todo:
        data = job_data(base, suite, job)
        entry = train_expert(base, data, cache, job, out_dir, progress=progress)
        record_expert(out_dir, manifest, entry, jobs)
        bar.update(1)  # tqdm's ETA: experts left x mean time of the experts trained so far
    bar.close()
    return manifest


def library_stamp(base: BaseModel, suite: TaskSuite, tasks: Sequence[str], settings: dict) -> Stamp:
    """The run a library build belongs to: its settings, training examples and base model."""
    data = [(ex.task, ex.prompt, ex.answer) for ex in suite.get("train", tasks)]
    return Stamp.of(settings, {"tasks": list(tasks), "train": data}, base.fingerprint)


def resume_manifest(
    out_dir: Path,
    base: BaseModel,
    suite: TaskSuite,
    tasks: Sequence[str],
    config: TrainConfig,
    extra: dict | None,
) -> LibraryManifest:
    """The manifest to continue: this run's, or a new one. A ``library.json`` written by a
    different run (other settings, tasks or base model) is refused, never added to."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LorafuseError("exists and is not a directory (give --out a library folder)", out_dir)
    settings = {"train": config.model_dump(), **(extra or {})}
    stamp = library_stamp(base, suite, tasks, settings)
    file = out_dir / MANIFEST_NAME
    if file.is_file():
        manifest = read_manifest(out_dir)
        have = Stamp.from_dict(manifest.config.get("stamp"))
        legacy = have is None and manifest.config.get("train") == settings["train"]
        if not legacy:
            hint = "train into a new --out, or delete it to start over"
            refuse_mismatch(file, have, stamp, "the library being built", hint)
        manifest.config["stamp"] = stamp.as_dict()
        return manifest
    out_dir.mkdir(parents=True, exist_ok=True)
    return new_manifest(base.name, [], {**settings, "stamp": stamp.as_dict()})


def write_expert_card(adapter_dir: Path, entry: ExpertEntry, base_name: str) -> None:
    """A short model card (replaces PEFT's generic template) saying what the expert is."""
    train = ", ".join(f"{k}={v}" for k, v in entry.train.items())
    metrics = ", ".join(f"{k}={v}" for k, v in entry.metrics.items())
    text = (
        f"---\nbase_model: {base_name}\nlibrary_name: peft\ntags: [lorafuse, lora]\n---\n\n"
        f"# lorafuse expert `{entry.name}` ({entry.kind})\n\n"
        f"LoRA adapter for `{base_name}` trained by `lorafuse train` on the answer tokens of "
        f"task(s): {', '.join(entry.tasks)}.\n\n"
        f"Training: {train}\n\nMetrics: {metrics}\n"
    )
    atomic_write_text(adapter_dir / "README.md", text)
