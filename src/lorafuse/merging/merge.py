"""The static-merge driver: K adapters in, one adapter's factors out, one module at a time.

For each module only the K experts' factors of that module are loaded; the method (see
``registry``) turns them into one LoRA:

* factor-space methods return factors directly: exact when ``rank`` is None, else the best
  rank-``rank`` approximation (``compress_factors``, no dense matrix formed);
* dense-space methods get the experts' dense fp32 deltas and return a dense delta, which is
  compressed to rank ``rank`` by truncated SVD; ``rank=None`` means ``sum_k r_k`` (capped at
  ``min(d_out, d_in)``). TIES/DARE/magnitude outputs are generally full-rank, so that
  re-compression is lossy unless ``rank >= min(d_out, d_in)``.

Randomness (DARE drops, randomized SVD) is seeded per module from ``(seed, module name)``, so
results are reproducible and do not depend on iteration order or on the other modules.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from lorafuse.errors import LorafuseError
from lorafuse.library import LoraAdapter, LoraFactors
from lorafuse.merging.registry import MergeMethod, MergeParams, get_method
from lorafuse.merging.svd import compress_dense, compress_factors

__all__ = ["merge", "merge_module", "module_seed", "resolve_weights"]

_DRIVER_FIELDS = ("rank", "svd", "svd_niter")  # used here, not passed to the method's fn


def merge(
    adapters: Sequence[LoraAdapter],
    method: str,
    weights: Sequence[float] | None = None,
    *,
    progress: bool = True,
    **params: Any,
) -> dict[str, LoraFactors]:
    """Merge ``adapters`` with the registered ``method``; returns ``{module: factors}``.

    ``params`` are the method's parameters (validated; see ``MERGE_METHODS[method].params``).
    ``weights`` default per method (1/K or 1 each). Modules are those of the first adapter;
    compatibility (same modules and shapes) is the caller's job (``check_compatible``).
    The result can be written with ``save_adapter``.
    """
    spec = get_method(method)
    parsed = spec.parse_params(params)
    if not adapters:
        raise LorafuseError("no adapters to merge")
    w = resolve_weights(spec, len(adapters), weights)
    modules = adapters[0].module_names
    out: dict[str, LoraFactors] = {}
    for module in tqdm(modules, desc=f"merge {method}", unit="module", disable=not progress):
        parts = [a.factors(module) for a in adapters]
        seed = module_seed(getattr(parsed, "seed", 0), module)
        out[module] = merge_module(spec, parts, w, parsed, seed=seed)
    return out


def merge_module(
    method: MergeMethod,
    parts: Sequence[LoraFactors],
    weights: Sequence[float],
    params: MergeParams,
    *,
    seed: int = 0,
) -> LoraFactors:
    """One module: the K experts' factors in, the merged LoRA factors out.

    ``seed`` replaces ``params.seed`` for this module (the driver passes ``module_seed``).
    """
    kwargs = params.model_dump()
    rank: int | None = kwargs.pop("rank")
    svd = kwargs.pop("svd", "full")
    niter = kwargs.pop("svd_niter", 2)
    if "seed" in kwargs:
        kwargs["seed"] = seed
    if method.space == "factors":
        result: LoraFactors = method.fn(list(parts), list(weights), **kwargs)
        if rank is not None and rank < result.rank:
            result = compress_factors(result, rank)
        return result
    deltas = [p.delta() for p in parts]
    dense = method.fn(deltas, list(weights), **kwargs)
    del deltas
    if rank is None:
        rank = sum(p.rank for p in parts)
    return compress_dense(dense, rank, randomized=svd == "randomized", niter=niter, seed=seed)


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
