"""Train a library: one private expert per task plus a multi-task adapter, resumable.

The manifest is rewritten after every expert, so an interrupted run picks up where it
stopped (finished experts are kept, a half-trained one resumes from its checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from lorafuse.core.encode import encode_examples
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
) -> LibraryManifest:
    """Train private experts (one per task) and a multi-task adapter into ``out_dir``."""
    out_dir = Path(out_dir)
    tasks = list(tasks or suite.tasks)
    cache = StateCache(base, split_layer(base.model, config.top_layers), progress=progress)
    manifest = _resume_manifest(out_dir, base, suite, tasks, config, extra_config)
    done = {e.name for e in manifest.experts if (out_dir / e.path).is_dir()}
    jobs = [(t, [t], "private", config) for t in tasks]
    mt_config = config.model_copy(update={"steps": multitask_steps or 2 * config.steps})
    jobs.append((MULTITASK, tasks, MULTITASK, mt_config))
    todo = [job for job in jobs if job[0] not in done]
    bar = tqdm(
        total=len(jobs),
        initial=len(jobs) - len(todo),
        desc="library",
        unit="expert",
        disable=not progress,
    )
    for name, job_tasks, kind, cfg in todo:
        examples = suite.get("train", job_tasks)
        encoded = encode_examples(base.tokenizer, examples)
        rel = f"experts/{name}"
        started = time.perf_counter()
        result = train_adapter(
            base, encoded, cache, cfg, out_dir / rel, desc=f"train {name}", progress=progress
        )
        entry = ExpertEntry(
            name=name,
            path=rel,
            tasks=job_tasks,
            kind=kind,
            train={**cfg.model_dump(), "n_train": len(examples)},
            metrics={
                "train_time_s": round(result.train_time_s, 1),
                "wall_time_s": round(time.perf_counter() - started, 1),
                "final_train_loss": round(sum(result.losses[-10:]) / len(result.losses[-10:]), 4),
            },
        )
        write_expert_card(out_dir / rel, entry, base.name)
        manifest.experts = [e for e in manifest.experts if e.name != name] + [entry]
        write_manifest(out_dir, manifest)
        bar.update(1)  # tqdm's ETA: experts left x mean time of the experts trained so far
    bar.close()
    return manifest


def library_stamp(base: BaseModel, suite: TaskSuite, tasks: Sequence[str], settings: dict) -> Stamp:
    """The run a library build belongs to: its settings, training examples and base model."""
    data = [(ex.task, ex.prompt, ex.answer) for ex in suite.get("train", tasks)]
    return Stamp.of(settings, {"tasks": list(tasks), "train": data}, base.fingerprint)


def _resume_manifest(
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
