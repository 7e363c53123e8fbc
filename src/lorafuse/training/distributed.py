"""``lorafuse train --ray``: every expert of a library is one Ray task.

The driver encodes the data and submits one task per expert that is not in the library
yet (the longest first); each lands in the library (adapter folder written atomically,
manifest rewritten) as soon as it finishes, so a rerun skips it. A task runs exactly what
the serial run runs (:func:`lorafuse.training.library.train_expert`, same seed, states
computed task by task), so the experts equal the serial run's.

Shared state lives on the filesystem: the library folder (and the checkpoints of
half-trained experts beside it) and the lower-layer state cache (``$LORAFUSE_CACHE``)
must be paths every node sees; the base model is reloaded on each worker from its folder
(or sent through the object store when it has none, as in tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from lorafuse.core.forward import plan_of
from lorafuse.core.states import StateCache
from lorafuse.errors import LorafuseError
from lorafuse.library import ExpertEntry, LibraryManifest
from lorafuse.models import EMBEDDED, BaseModel, cache_root, load_base_model
from lorafuse.tasks.example import TaskSuite
from lorafuse.training.config import TrainConfig
from lorafuse.training.library import (
    ExpertJob,
    JobData,
    job_data,
    library_jobs,
    pending_jobs,
    record_expert,
    resume_manifest,
    train_expert,
)
from lorafuse.training.train import split_layer

INSTALL_HINT = "Ray is not installed: pip install 'lorafuse[ray]'"


def import_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise LorafuseError(INSTALL_HINT) from None
    return ray


def connect(address: str) -> None:
    """Join a Ray cluster: ``auto`` = the running one (``$RAY_ADDRESS`` or ``ray start`` on
    this machine) else a new local one; ``local`` = always a new local one; else an address
    (``HOST:PORT``, ``ray://HOST:10001``). No-op when this process is already connected."""
    ray = import_ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=None if address == "auto" else address, log_to_driver=False)
    except (ConnectionError, ValueError) as err:
        raise LorafuseError(f"--ray {address}: {str(err).splitlines()[0]}") from None


def base_spec(base: BaseModel) -> str | BaseModel:
    """How a worker gets the base model: ``embedded`` (each node converts its own copy),
    a model folder, or (a model with no folder) the model itself, via the object store;
    then with only the tokenizer's pad id (workers get the data already encoded)."""
    if base.path is None:
        return replace(base, tokenizer=SimpleNamespace(pad_token_id=base.tokenizer.pad_token_id))
    if base.path == cache_root() / "models" / "SmolLM2-135M-Instruct":  # embedded_model_dir()
        return EMBEDDED
    return str(base.path.resolve())


def worker_base(base: str | BaseModel, device: str, threads: int) -> BaseModel:
    """In a worker: ``threads`` torch threads, and the base model (from :func:`base_spec`)
    on ``device``."""
    torch.set_num_threads(threads)
    if isinstance(base, str):
        return load_base_model(base, device=device)
    base.model.to(device)
    return base


def submit_options(ray, cpus: int, gpus: float | None) -> tuple[dict, str]:
    """Ray task resources (GPUs: 1 when the cluster has any, unless given) and the device
    a worker then uses."""
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return {"num_cpus": cpus, "num_gpus": gpus}, "cuda" if gpus > 0 else "cpu"


def run_job(
    base: str | BaseModel,
    job: ExpertJob,
    data: JobData,
    out_dir: str,
    cache_dir: str | None,
    device: str,
    threads: int,
) -> ExpertEntry:
    """One expert, in a Ray worker (a plain function: callable without Ray, too)."""
    base = worker_base(base, device, threads)
    split = split_layer(base.model, job.config.top_layers)
    directory = Path(cache_dir) if cache_dir else None
    cache = StateCache(base, split, directory, persist=directory is not None, progress=False)
    return train_expert(base, data, cache, job, Path(out_dir), progress=False)


def train_library_ray(
    base: BaseModel,
    suite: TaskSuite,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    address: str = "auto",
    cpus_per_expert: int = 1,
    gpus_per_expert: float | None = None,
    multitask_steps: int | None = None,
    tasks: Sequence[str] | None = None,
    extra_config: dict | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> LibraryManifest:
    """:func:`~lorafuse.training.library.train_library` with one Ray task per expert.

    ``gpus_per_expert`` None = 1 when the cluster has GPUs, else 0 (fractions share a GPU).
    ``cache_dir``: the lower-layer state cache every worker reads and writes (default
    ``$LORAFUSE_CACHE/states``).
    """
    ray = import_ray()
    out_dir = Path(out_dir).resolve()
    tasks = list(tasks or suite.tasks)
    jobs = library_jobs(tasks, config, multitask_steps)
    manifest = resume_manifest(out_dir, base, suite, tasks, config, extra_config)
    todo = pending_jobs(out_dir, manifest, jobs)
    if not todo:
        return manifest
    connect(address)
    resources, device = submit_options(ray, cpus_per_expert, gpus_per_expert)
    persist = plan_of(base.model).path != "full"  # as StateCache decides
    states = str(Path(cache_dir or cache_root() / "states").resolve()) if persist else None
    remote = ray.remote(run_job)
    base_arg = shipped_base(ray, base)
    # the longest jobs first: the multi-task adapter (most steps, all data) ends last otherwise
    todo = sorted(todo, key=lambda job: -job.config.steps)
    running = {
        remote.options(**resources, name=f"lorafuse:{job.name}").remote(
            base_arg, job, job_data(base, suite, job), str(out_dir), states, device,
            cpus_per_expert,
        ): job
        for job in todo
    }  # fmt: skip
    bar = tqdm(
        total=len(jobs), initial=len(jobs) - len(todo), desc="library (ray)", unit="expert",
        disable=not progress,
    )  # fmt: skip
    failures: list[tuple[str, BaseException]] = []
    while running:
        done, _ = ray.wait(list(running), num_returns=1)
        job = running.pop(done[0])
        try:
            entry = ray.get(done[0])
        except ray.exceptions.RayError as err:  # the others still finish and are kept
            failures.append((job.name, err))
            continue
        record_expert(out_dir, manifest, entry, jobs)
        bar.update(1)
    bar.close()
    raise_first(failures, "expert")
    return manifest


def shipped_base(ray, base: BaseModel):
    """:func:`base_spec`, a model put into the object store once for all tasks."""
    spec = base_spec(base)
    return ray.put(spec) if isinstance(spec, BaseModel) else spec


def raise_first(failures: Sequence[tuple[str, BaseException]], what: str) -> None:
    """Re-raise the first failed task's error (one line for a :class:`LorafuseError`)."""
    if not failures:
        return
    name, err = failures[0]
    cause = getattr(err, "cause", None)
    if isinstance(cause, LorafuseError):
        raise LorafuseError(f"{what} {name}: {cause}") from None
    raise err
