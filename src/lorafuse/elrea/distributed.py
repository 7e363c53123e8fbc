"""``lorafuse elrea --ray``: gradient features sharded across Ray workers, chunk by chunk.

The same chunks and files as :func:`lorafuse.elrea.features.gradient_features` (so a serial
run and a Ray run resume each other's work): the driver plans the chunks, computes the
lower-layer states once into the shared state cache (and the second moment, if not
given), then submits one task per missing chunk; each worker reads its examples' states
from the cache, computes the chunk's features and writes its file atomically. A chunk
depends only on its own examples, so the result equals the serial one bit for bit (same
device, same threads).

Shared state lives on the filesystem: the feature folder and the state cache must be
paths every node sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorafuse.core.encode import Encoded
from lorafuse.core.states import StateCache
from lorafuse.elrea.adam_state import AdamMoments
from lorafuse.elrea.features import FeatureJob, gradient_features, write_feature_chunks
from lorafuse.models import BaseModel
from lorafuse.training.distributed import (
    connect,
    import_ray,
    raise_first,
    shipped_base,
    submit_options,
    worker_base,
)


def run_chunk(
    base: str | BaseModel,
    adapter_path: str,
    encoded: list[Encoded],
    file: str,
    adam: AdamMoments,
    split: int,
    cache_dir: str | None,
    settings: dict,
    device: str,
    threads: int,
) -> str:
    """One chunk's features, in a Ray worker (a plain function: callable without Ray)."""
    base = worker_base(base, device, threads)
    directory = Path(cache_dir) if cache_dir else None
    cache = StateCache(base, split, directory, persist=directory is not None, progress=False)
    states = cache.get(encoded)
    chunk = list(range(len(encoded)))  # stable sort: the chunk's batches are the serial ones
    write_feature_chunks(
        base, adapter_path, states, encoded, adam, [chunk], [Path(file)], split=split,
        **settings,
    )  # fmt: skip
    return file


def gradient_features_ray(
    base: BaseModel,
    adapter_path: str | Path,
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    address: str = "auto",
    cpus_per_task: int = 1,
    gpus_per_task: float | None = None,
    **settings,
) -> torch.Tensor:
    """:func:`~lorafuse.elrea.features.gradient_features` (same ``settings``) with one Ray
    task per missing chunk."""

    def on_ray(job: FeatureJob) -> None:
        write_on_ray(job, address, cpus_per_task, gpus_per_task)

    return gradient_features(base, adapter_path, encoded, cache, writer=on_ray,
                             **settings)  # fmt: skip


def write_on_ray(
    job: FeatureJob, address: str, cpus_per_task: int, gpus_per_task: float | None
) -> None:
    """Submit one task per chunk of ``job``; every chunk lands even when another fails."""
    ray = import_ray()
    job.cache.get(job.encoded, desc="grad features: states")  # once, into the shared cache
    connect(address)
    resources, device = submit_options(ray, cpus_per_task, gpus_per_task)
    cache_dir = str(job.cache.directory.resolve()) if job.cache.directory is not None else None
    base_arg = shipped_base(ray, job.base)
    v_ref = ray.put(job.moments)
    remote = ray.remote(run_chunk)
    running = {
        remote.options(**resources, name=f"lorafuse:features-{file.stem}").remote(
            base_arg, str(job.adapter_path.resolve()), [job.encoded[i] for i in chunk],
            str(file.resolve()), v_ref, job.cache.split, cache_dir, job.settings, device,
            cpus_per_task,
        ): file.stem
        for chunk, file in zip(job.chunks, job.files, strict=True)
    }  # fmt: skip
    bar = tqdm(total=len(running), disable=not job.progress)
    failures: list[tuple[str, BaseException]] = []
    while running:
        done, _ = ray.wait(list(running), num_returns=1)
        name = running.pop(done[0])
        try:
            ray.get(done[0])
        except ray.exceptions.RayError as err:  # the other chunks still land
            failures.append((name, err))
        bar.update(1)
    bar.close()
    raise_first(failures, "feature chunk")
