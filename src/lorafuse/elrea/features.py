"""ELREA gradient features: one projected, Adam-normalised LoRA gradient per example.

ELREA (ensembles of low-rank expert adapters) clusters training examples by the gradient
they induce on a base adapter. A feature is built in four steps:

1. **Per-example gradient** of a loss with respect to every ``lora_A`` / ``lora_B`` weight
   of the base adapter. ``target="prompt"`` (default, as in ELREA, which takes the gradient
   "on the instruction tokens only") uses the mean next-token NLL *inside the prompt*:
   positions ``0..prompt_len-2`` predicting prompt tokens ``1..prompt_len-1``. It needs no
   answer, so an unlabeled prompt at inference gets a feature from the same definition
   (the answer tokens are not even run). ``target="answer"`` uses the mean NLL of the answer
   tokens (the training loss). Examples with no target token get a zero feature.
2. **Adam normalisation** as in ELREA's eq. 5 (after LESS): with the base adapter's
   optimizer state (both moments, ``adam_state`` with ``exp_avg``, ``exp_avg_sq`` and
   ``step``), Adam's bias-corrected update direction ``m_hat / (sqrt(v_hat) + eps)`` had
   ``g`` been the next gradient (:mod:`lorafuse.elrea.adam_state`). With the second moment
   only: ``g / (sqrt(v) + eps)``. Adapters are usually saved without optimizer state; then
   ``v`` is *estimated* as the mean of squared per-example gradients over the given
   examples (:func:`estimate_second_moment`, a first pass, cached on disk). This is larger
   than Adam's average of squared mini-batch gradients, by up to the batch size where the
   gradients are mostly noise; only its shape across parameters matters after step 4,
   except relative to ``eps``. To featurise new prompts consistently, pass the training
   set's estimate as ``adam_state``.
3. **Random projection** (Johnson-Lindenstrauss) of the flat gradient (parameters in model
   order, A before B of each module, each weight row-major) to ``dim`` dimensions by a seeded
   Rademacher (default) or Gaussian matrix scaled by ``1/sqrt(dim)``. The matrix is never
   held whole: it is generated in row blocks, each from its own seed, so it depends only on
   ``(seed, kind, dim, P)`` and memory stays bounded for any ``P`` and ``dim``.
4. **L2 normalisation**.

Per-example gradients: :mod:`lorafuse.elrea.lora_grads`; Adam normalisation and the
projection: :mod:`lorafuse.elrea.projection`.

Features are cached under ``cache_root()/"grad_features"`` (or ``directory``) in a folder
named by a hash of the base model, adapter weights, settings and the ordered examples, one
safetensors file per chunk of ``chunk_size`` examples, each written atomically; a run
interrupted part-way resumes at the first missing chunk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lorafuse.core.encode import Encoded
from lorafuse.core.peft_adapters import peft_adapters
from lorafuse.core.states import StateCache
from lorafuse.elrea.adam_state import AdamMoments
from lorafuse.elrea.feature_cache import (
    _adam_state,
    _adapter_fingerprint,
    _examples_hash,
    _key,
    feature_plan,
)
from lorafuse.elrea.lora_grads import TARGETS, _canonical, lora_linears, per_example_lora_grads
from lorafuse.elrea.projection import (
    MAX_DIM,
    PROJECTIONS,
    adam_normalise,
    adam_update,
    moment_vector,
    project_many,
    second_moment_vector,
)
from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_path, atomic_write_json
from lorafuse.library import LoraAdapter
from lorafuse.models import BaseModel, cache_root

__all__ = ["estimate_second_moment", "gradient_features"]

_ADAPTER = "elrea_base"  # adapter name while attached to the base model
GROUP_BYTES = 1 << 30  # gradients held at once to share one generation of the projection


def _open_adapter(adapter_path: str | Path, split: int) -> LoraAdapter:
    adapter = LoraAdapter.open(adapter_path)

    def layer(module: str) -> int:
        hit = re.search(r"\.layers\.(\d+)\.", module)
        return int(hit.group(1)) if hit else -1  # not in a decoder layer: below any split

    below = [m for m in adapter.module_names if layer(m) < split]
    if below:
        raise LorafuseError(
            f"adapter adapts layers below the state cache's split {split} ({below[0]}); "
            "use a StateCache at the adapter's first layer",
            adapter.path,
        )
    return adapter


def _length_batches(encoded: Sequence[Encoded], indices: Sequence[int], size: int):
    """Batches of ``indices`` in order of sequence length (less padding)."""
    order = sorted(indices, key=lambda i: len(encoded[i].ids))
    return [order[s : s + size] for s in range(0, len(order), size)]


def _batched_grads(model, linears, states, encoded, indices, split, pad_id, target, batch_size):
    """(len(indices), P) gradients of ``indices``, rows in the order given."""
    row = {i: r for r, i in enumerate(indices)}
    out = None
    for idx in _length_batches(encoded, indices, batch_size):
        grads = per_example_lora_grads(
            model,
            [states[i] for i in idx],
            [encoded[i] for i in idx],
            split,
            pad_id,
            target=target,
            linears=linears,
        )
        if out is None:
            out = grads.new_empty(len(indices), grads.shape[1])
        out[torch.tensor([row[i] for i in idx])] = grads
    return out


def estimate_second_moment(
    base: BaseModel,
    adapter_path: str | Path,
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    target: str = "prompt",
    batch_size: int = 16,
    directory: str | Path | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The fallback for a missing Adam state: mean over ``encoded`` of squared gradients.

    Returned (and cached on disk) per parameter, shaped and named like the adapter's weights,
    so it can be passed back as ``adam_state`` (e.g. to featurise test prompts with the
    training set's estimate).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if not encoded:
        raise ValueError("estimate_second_moment needs at least one example")
    adapter = _open_adapter(adapter_path, cache.split)
    root = Path(directory) if directory is not None else cache_root() / "grad_features"
    key = _key(
        kind="second_moment",
        base=base.fingerprint,
        adapter=_adapter_fingerprint(adapter),
        split=cache.split,
        target=target,
        examples=_examples_hash(encoded),
    )
    file = root / f"second_moment-{key}.safetensors"
    if file.is_file():
        return load_file(str(file))
    states = cache.get(encoded, desc="grad features: states")
    with peft_adapters(base, {_ADAPTER: adapter.path}) as model:
        return _second_moment(
            model, states, encoded, cache.split, base, target, batch_size, file, progress
        )


def _second_moment(model, states, encoded, split, base, target, batch_size, file, progress):
    linears = lora_linears(model)
    total = None
    bar = tqdm(total=len(encoded), desc="grad features: v", disable=not progress, leave=False)
    for idx in _length_batches(encoded, range(len(encoded)), batch_size):
        grads = per_example_lora_grads(
            model,
            [states[i] for i in idx],
            [encoded[i] for i in idx],
            split,
            base.tokenizer.pad_token_id,
            target=target,
            linears=linears,
        )
        sq = grads.square().sum(0)
        total = sq if total is None else total.add_(sq)
        bar.update(len(idx))
    bar.close()
    mean = (total / max(1, len(encoded))).cpu()
    out, offset = {}, 0
    for lin in linears:
        out[_canonical(lin.name)] = (
            mean[offset : offset + lin.numel].view_as(lin.module.weight).clone()
        )
        offset += lin.numel
    with atomic_path(file) as tmp:
        save_file(out, str(tmp))
    return out


def write_feature_chunks(
    base: BaseModel,
    adapter_path: str | Path,
    states: Sequence[torch.Tensor],
    encoded: Sequence[Encoded],
    adam: AdamMoments,
    chunks: Sequence[Sequence[int]],
    files: Sequence[Path],
    *,
    split: int,
    dim: int,
    seed: int,
    target: str,
    projection: str,
    eps: float,
    batch_size: int,
    progress: bool = False,
) -> None:
    """Compute and write (each atomically) the features of ``chunks[c]`` to ``files[c]``.

    A chunk's features depend only on its own examples (in order) and the settings, so
    any process can write any chunk (:mod:`lorafuse.elrea.distributed`).
    """
    pad = base.tokenizer.pad_token_id
    with peft_adapters(base, {_ADAPTER: Path(adapter_path)}) as model:
        linears = lora_linears(model)
        v = second_moment_vector(adam.v, linears)
        m = None if adam.m is None else moment_vector(adam.m, linears, "exp_avg")
        bar = tqdm(total=sum(len(c) for c in chunks), desc="grad features", disable=not progress)
        per_group = chunks_per_projection(max(map(len, chunks), default=1), v.numel())
        for g in range(0, len(chunks), per_group):
            group = chunks[g : g + per_group]
            normalised = []
            for c in group:
                grads = _batched_grads(
                    model, linears, states, encoded, c, split, pad, target, batch_size
                )
                if m is None:
                    normalised.append(adam_normalise(grads, v, eps))
                else:
                    normalised.append(adam_update(grads, m, v, adam.step, adam.betas, eps))
                del grads
            projected = project_many(normalised, dim, seed, projection)
            del normalised
            for feats, chunk, file in zip(projected, group, files[g : g + per_group], strict=True):
                feats = nn.functional.normalize(feats, dim=1).cpu().contiguous()
                with atomic_path(file) as tmp:
                    save_file({"features": feats}, str(tmp))
                bar.update(len(chunk))
        bar.close()


def chunks_per_projection(chunk_len: int, p: int) -> int:
    """How many chunks' gradients (``chunk_len x p`` floats each, within ``GROUP_BYTES``)
    share one generation of the projection blocks, which costs about as much as projecting
    one chunk of 64 with them. Each chunk is still written as its own file; a kill loses at
    most one group."""
    return max(1, GROUP_BYTES // (4 * chunk_len * p))


def check_feature_settings(
    target: str, projection: str, dim: int, batch_size: int, chunk_size: int
) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if not 1 <= dim <= MAX_DIM:
        raise ValueError(f"dim must be in 1..{MAX_DIM}, got {dim}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be positive")


@dataclass(frozen=True)
class FeatureJob:
    """The chunks a features call still has to write, with everything needed to write them
    (handed to a ``writer``: in this process, or one Ray task per chunk)."""

    base: BaseModel
    adapter_path: Path
    encoded: Sequence[Encoded]
    cache: StateCache
    moments: AdamMoments
    chunks: list[list[int]]
    files: list[Path]
    settings: dict  # dim, seed, target, projection, eps, batch_size
    progress: bool


def write_here(job: FeatureJob) -> None:
    """Write a job's chunks in this process."""
    states = job.cache.get(job.encoded, desc="grad features: states")
    write_feature_chunks(
        job.base, job.adapter_path, states, job.encoded, job.moments, job.chunks, job.files,
        split=job.cache.split, progress=job.progress, **job.settings,
    )  # fmt: skip


def gradient_features(
    base: BaseModel,
    adapter_path: str | Path,
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    dim: int = 1024,
    seed: int = 0,
    target: str = "prompt",
    batch_size: int = 16,
    adam_state: AdamMoments | Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]] | None = None,
    eps: float = 1e-8,
    projection: str = "rademacher",
    chunk_size: int = 64,
    directory: str | Path | None = None,
    progress: bool = True,
    writer: Callable[[FeatureJob], None] = write_here,
) -> torch.Tensor:
    """Unit-norm ELREA gradient features (N, dim) of ``encoded`` for the adapter at
    ``adapter_path`` (see the module docstring for the four steps).

    ``adam_state``: ``exp_avg_sq`` per LoRA weight, or the optimizer's per-weight state
    (with ``exp_avg`` and ``step``: both moments are used), or :class:`AdamMoments`; without
    it ``v`` is estimated over ``encoded`` (:func:`estimate_second_moment`). Results are
    cached on disk per chunk of ``chunk_size`` examples; an interrupted call resumes.
    Chunks' full gradients (``chunk_size * P`` floats each) are held a group at a time,
    within :data:`GROUP_BYTES`, and the projection matrix is generated once per group.
    ``writer`` writes the missing chunks (default: here; :mod:`lorafuse.elrea.distributed`
    on Ray).
    """
    check_feature_settings(target, projection, dim, batch_size, chunk_size)
    if not encoded:
        return torch.zeros(0, dim)
    adapter = _open_adapter(adapter_path, cache.split)
    moments, v_hash = _adam_state(adam_state)
    normalisation = "second_moment" if moments is None else moments.normalisation
    plan = feature_plan(
        base, adapter, encoded, cache.split, dim=dim, seed=seed, target=target,
        projection=projection, eps=eps, v_hash=v_hash, normalisation=normalisation,
        chunk_size=chunk_size, directory=directory,
    )  # fmt: skip
    if plan.todo:
        if not (plan.run / "settings.json").is_file():
            atomic_write_json(plan.run / "settings.json", {**plan.settings, "n": len(encoded)})
        if moments is None:
            moments = AdamMoments(estimate_second_moment(
                base, adapter.path, encoded, cache, target=target, batch_size=batch_size,
                directory=plan.run.parent, progress=progress,
            ))  # fmt: skip
        settings = dict(
            dim=dim, seed=seed, target=target, projection=projection, eps=eps,
            batch_size=batch_size,
        )  # fmt: skip
        writer(FeatureJob(
            base, Path(adapter.path), encoded, cache, moments,
            [list(plan.chunks[c]) for c in plan.todo], [plan.files[c] for c in plan.todo],
            settings, progress,
        ))  # fmt: skip
    return plan.load()
