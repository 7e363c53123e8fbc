"""The static-merge driver: K adapters in, one adapter's factors out, one module at a time.

For each module only the K experts' factors of that module are loaded; the method (see
``registry``) turns them into one LoRA:

* factor-space methods return factors directly: exact when ``rank`` is None, else the best
  rank-``rank`` approximation (``compress_factors``, no dense matrix formed);
* dense-space methods get the experts' dense fp32 deltas, stacked in one (K, d_out, d_in)
  tensor (a sequence of the K deltas: ``len``, indexing and iteration work as on a list),
  and return a dense delta, which is compressed to rank ``rank`` by truncated SVD
  (``svd``: ``"gram"``, exact and the default; ``"full"``; ``"randomized"``, see
  ``compress_dense``); ``rank=None`` means ``sum_k r_k`` (capped at ``min(d_out, d_in)``).
  TIES/DARE/magnitude outputs are generally full-rank, so that re-compression is lossy
  unless ``rank >= min(d_out, d_in)``.

Randomness (DARE drops, randomized SVD) is seeded per module from ``(seed, module name)``, so
results are reproducible and do not depend on iteration order or on the other modules.

Modules run concurrently, ``threads`` at a time (default: torch's thread count), each on one
thread (see ``threads``: faster than torch's intra-op threads on these small ops, and
bit-identical to ``threads=1``). Memory stays bounded by a few modules' stacked deltas: at
most ``2 * threads`` modules are in flight, within ``memory_budget`` bytes of stacked
deltas (one module at a time if one alone exceeds it).
"""

from __future__ import annotations

import hashlib
import math
import queue
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from lorafuse.errors import LorafuseError
from lorafuse.library import LoraAdapter, LoraFactors, module_factors, union_modules
from lorafuse.merging.registry import MergeMethod, MergeParams, get_method
from lorafuse.merging.svd import compress_dense
from lorafuse.merging.threads import DEFAULT_MEMORY_BUDGET, map_in_order
from lorafuse.merging.truncation import (
    Truncation,
    dense_truncation,
    truncate_dense_auto,
    truncate_factors,
)

__all__ = [
    "DeltaBuffer",
    "merge",
    "merge_module",
    "module_seed",
    "resolve_weights",
    "stack_deltas",
]

# used here, not passed to the method's fn
_DRIVER_FIELDS = ("rank", "energy", "max_rank", "svd", "svd_niter")


def merge(
    adapters: Sequence[LoraAdapter],
    method: str,
    weights: Sequence[float] | None = None,
    *,
    progress: bool = True,
    threads: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    truncation: dict[str, Truncation] | None = None,
    **params: Any,
) -> dict[str, LoraFactors]:
    """Merge ``adapters`` with the registered ``method``; returns ``{module: factors}``.

    ``params`` are the method's parameters (validated; see ``MERGE_METHODS[method].params``).
    ``weights`` default per method (1/K or 1 each). Modules are the union of the adapters'
    (zero factors where one has none); shapes are the caller's job (``check_compatible``).
    The result can be written with ``save_adapter``. Pass a dict as ``truncation`` to get
    what re-compression lost per module (see ``truncation.Truncation``).

    ``threads`` modules run at a time, each single-threaded (``None``: torch's thread count;
    the result does not depend on it); ``memory_budget`` bounds the bytes of stacked dense
    deltas of the modules in flight (see the module doc).
    """
    spec = get_method(method)
    parsed = spec.parse_params(params)
    if not adapters:
        raise LorafuseError("no adapters to merge")
    w = resolve_weights(spec, len(adapters), weights)
    modules = union_modules(adapters)
    jobs = ((m, module_factors(adapters, m)) for m in modules)  # read as admitted
    buffers: queue.SimpleQueue[DeltaBuffer] = queue.SimpleQueue()  # one per busy worker
    results = map_in_order(
        partial(_merge_job, spec, w, parsed, buffers),
        jobs,
        threads,
        cost=_stacked_bytes if spec.space == "dense" else None,
        budget=memory_budget,
    )
    bar = tqdm(total=len(modules), desc=f"merge {method}", unit="module", disable=not progress)
    out: dict[str, LoraFactors] = {}
    with bar:
        for module, (result, lost) in zip(modules, results, strict=True):
            out[module] = result
            if truncation is not None and lost:
                truncation[module] = lost[0]
            bar.update()
    return out


def _merge_job(
    spec: MergeMethod,
    weights: Sequence[float],
    params: MergeParams,
    buffers: queue.SimpleQueue[DeltaBuffer],
    job: tuple[str, list[LoraFactors]],
) -> tuple[LoraFactors, list[Truncation]]:
    """One module of ``merge`` and what its re-compression lost, on a free buffer of
    ``buffers`` (a new one if none is free)."""
    module, parts = job
    try:
        buffer = buffers.get_nowait()
    except queue.Empty:
        buffer = DeltaBuffer()
    try:
        seed = module_seed(getattr(params, "seed", 0), module)
        lost: list[Truncation] = []
        result = merge_module(
            spec, parts, weights, params, seed=seed, buffer=buffer, truncation=lost
        )
        return result, lost
    finally:
        buffers.put(buffer)


def _stacked_bytes(job: tuple[str, list[LoraFactors]]) -> int:
    """Bytes of a module's K stacked dense fp32 deltas (its working memory, roughly)."""
    _, parts = job
    return len(parts) * parts[0].d_out * parts[0].d_in * 4


class DeltaBuffer:
    """One flat buffer that holds a module's stacked deltas, then the next module's (grown to
    the largest so far), so that module after module reuses the same memory: a fresh tensor
    of that size costs page faults about as long as filling it. One per worker thread."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A tensor of ``shape`` on the buffer (its contents undefined), valid until the next
        ``take``."""
        n = math.prod(shape)
        buf = self._buffer
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            self._buffer = buf = None  # free the old one first
            self._buffer = buf = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


def merge_module(
    method: MergeMethod,
    parts: Sequence[LoraFactors],
    weights: Sequence[float],
    params: MergeParams,
    *,
    seed: int = 0,
    buffer: DeltaBuffer | None = None,
    truncation: list[Truncation] | None = None,
) -> LoraFactors:
    """One module: the K experts' factors in, the merged LoRA factors out.

    ``seed`` replaces ``params.seed`` for this module (the driver passes ``module_seed``).
    A dense method's stacked deltas go into ``buffer`` if given (the driver passes one per
    worker thread), so they are overwritten by the next module's: a method reads them and
    must not keep them. When the result is re-compressed, what that lost is appended to
    ``truncation`` (if given).
    """
    kwargs = params.model_dump()
    rank: int | str | None = kwargs.pop("rank")
    energy, max_rank = kwargs.pop("energy", 0.99), kwargs.pop("max_rank", None)
    lost = truncation if truncation is not None else []
    svd = kwargs.pop("svd", "gram")
    niter = kwargs.pop("svd_niter", 2)
    if "seed" in kwargs:
        kwargs["seed"] = seed
    if method.space in ("factors", "svd"):
        result: LoraFactors = method.fn(list(parts), list(weights), **kwargs)
        if rank == "auto":
            result, info = truncate_factors(result, "auto", energy=energy, max_rank=max_rank)
            lost.append(info)
        elif rank is not None and rank < result.rank:
            result, info = truncate_factors(result, rank)  # one SVD: factors and record
            lost.append(info)
        return result
    deltas = stack_deltas(parts, buffer)  # ours: the method may overwrite it
    if method.overwrites:
        kwargs["overwrite"] = True
    dense = method.fn(deltas, list(weights), **kwargs)
    del deltas
    if rank is None or rank == "auto":
        cap = sum(p.rank for p in parts) if rank is None or max_rank is None else max_rank
        if rank == "auto":
            result, info = truncate_dense_auto(
                dense, energy=energy, max_rank=cap, svd=svd, niter=niter, seed=seed
            )
            lost.append(info)
            return result
        rank = cap
    result = compress_dense(dense, rank, svd=svd, niter=niter, seed=seed)
    lost.append(dense_truncation(dense, result))
    return result


def stack_deltas(parts: Sequence[LoraFactors], buffer: DeltaBuffer | None = None) -> torch.Tensor:
    """The experts' dense deltas ``scaling * B @ A`` stacked into one (K, d_out, d_in) tensor
    (on ``buffer`` if given, else a new tensor).

    Each is computed straight into its slice, as ``LoraFactors.delta`` computes it (same
    values), without a per-expert tensor and a copy. All parts must share a shape.
    """
    if not parts:
        raise ValueError("no factors to stack")
    dtype = torch.promote_types(parts[0].B.dtype, parts[0].A.dtype)
    shape = (len(parts), parts[0].d_out, parts[0].d_in)
    device = parts[0].A.device
    if buffer is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        out = buffer.take(shape, dtype, device)
    for k, p in enumerate(parts):
        if (p.d_out, p.d_in) != (out.shape[1], out.shape[2]):
            raise ValueError(
                f"expert {k} has shape {(p.d_out, p.d_in)}, expert 0 {tuple(out.shape[1:])}"
            )
        if p.A.dtype == dtype and p.B.dtype == dtype:
            torch.matmul(p.B, p.A, out=out[k]).mul_(p.scaling)
        else:
            out[k] = p.delta()
    return out


def resolve_weights(method: MergeMethod, k: int, weights: Sequence[float] | None) -> list[float]:
    """``weights`` as floats (one per adapter, finite), or the method's default."""
    if weights is None:
        return method.default_weight_list(k)
    w = [float(x) for x in weights]
    if len(w) != k:
        raise LorafuseError(f"got {len(w)} weights for {k} adapters")
    if not all(math.isfinite(x) for x in w):
        raise LorafuseError(f"weights must be finite numbers, got {w}")
    return w


def module_seed(seed: int, module: str) -> int:
    """A 63-bit seed for ``module`` derived from the user's ``seed`` (stable across runs)."""
    digest = hashlib.blake2b(f"{seed}\0{module}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
