"""Merge methods in dense space: K experts' dense deltas (d_out, d_in) for one module in,
one dense delta out.

Elementwise methods (TIES, DARE, magnitude pruning) act on individual entries of the deltas,
so they need the dense d_out x d_in matrices; their result is generally full-rank, and the
driver compresses it back to a LoRA by truncated SVD (lossy below full rank).

All of them are settings of one function, :func:`generalized_task_arithmetic` (as in
mergekit's "generalized task arithmetic"), in three steps:

1. **sparsify** each expert: ``"none"``; ``"magnitude"`` keeps the ``round(density * n)``
   entries of largest ``|value|`` (``torch.topk`` on the flattened magnitudes, so exactly that
   many even when magnitudes tie at the threshold; which of the tied entries survive is up to
   ``topk``); ``"random"`` (DARE) keeps each entry with probability ``density`` from a seeded
   ``torch.Generator`` and divides survivors by ``density``, which keeps the expectation.
2. **sign consensus** (optional): elect a sign per entry from the sparsified, *unweighted*
   experts: sign of their sum (``majority_sign="total"``) or of the sum of their signs
   (``"frequency"``); zero elects +. An expert takes part in an entry only if its sparsified
   value is nonzero and has the elected sign.
3. **combine**: ``"sum"`` gives ``sum_k w_k t_k``; ``"disjoint_mean"`` gives
   ``sum_{k agrees} w_k t_k / #{k agrees}`` (at least 1). Then times ``scale`` (lambda).

Steps 2-3 follow PEFT's ``ties``/``dare_ties`` (``peft.utils.merge_utils``) exactly: the sign
is elected on unweighted values and the disjoint mean divides by the number of agreeing experts,
not by the sum of their weights (mergekit and the TIES paper's weighted variant differ there).
One deviation: PEFT's magnitude pruning keeps ``int(density * n)`` entries, which floating
point can push one below the intended count (``int(0.29 * 100) == 28``); here it is
``round(density * n)``. The two agree whenever ``density * n`` is (close to) an integer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch

__all__ = ["generalized_task_arithmetic", "magnitude_prune", "random_drop"]

Sparsify = Literal["none", "magnitude", "random"]
Combine = Literal["sum", "disjoint_mean"]
MajoritySign = Literal["total", "frequency"]


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """A copy of ``delta`` keeping only its ``round(density * n)`` largest-magnitude entries."""
    n = delta.numel()
    k = round(density * n)
    if k >= n:
        return delta.clone()
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if k > 0:
        mask[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = True
    return delta * mask.reshape(delta.shape)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, divide the survivors by it.

    The mask is ``torch.bernoulli`` of a ``density``-filled tensor drawn from ``generator``,
    the same draw PEFT makes from the global RNG, so a generator seeded like the global one
    reproduces PEFT's masks. ``density >= 1`` draws nothing and returns a copy.
    """
    if density >= 1:
        return delta.clone()
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def generalized_task_arithmetic(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsify: Sparsify = "none",
    density: float = 1.0,
    sign_consensus: bool = False,
    majority_sign: MajoritySign = "total",
    combine: Combine = "sum",
    scale: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """sparsify -> optional sign consensus -> combine, times ``scale`` (see the module doc).

    ``deltas`` are the experts' dense deltas of one module (not modified); ``seed`` seeds the
    random drop (experts drawn in order from one generator), unused otherwise.
    """
    if len(deltas) == 0:
        raise ValueError("no deltas to merge")
    if len(weights) != len(deltas):
        raise ValueError(f"{len(weights)} weights for {len(deltas)} experts")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if majority_sign not in ("total", "frequency"):
        raise ValueError(f"unknown majority_sign {majority_sign!r}")

    if sparsify == "magnitude":
        trimmed = [magnitude_prune(d, density) for d in deltas]
    elif sparsify == "random":
        generator = torch.Generator(device=deltas[0].device).manual_seed(seed)
        trimmed = [random_drop(d, density, generator) for d in deltas]
    elif sparsify == "none":
        trimmed = list(deltas)
    else:
        raise ValueError(f"unknown sparsify {sparsify!r}")

    agree: list[torch.Tensor] | None = None
    if sign_consensus:
        votes = trimmed if majority_sign == "total" else (t.sign() for t in trimmed)
        elected = torch.where(_sum(votes) >= 0, 1.0, -1.0).to(trimmed[0].dtype)
        agree = [t.sign() == elected for t in trimmed]

    if combine == "sum":
        if agree is None:
            merged = _sum(w * t for t, w in zip(trimmed, weights, strict=True))
        else:
            merged = _sum((w * t) * m for t, w, m in zip(trimmed, weights, agree, strict=True))
    elif combine == "disjoint_mean":
        if agree is None:  # every nonzero entry takes part
            agree = [t != 0 for t in trimmed]
        total = _sum((w * t) * m for t, w, m in zip(trimmed, weights, agree, strict=True))
        count = _sum(m.to(total.dtype) for m in agree)
        merged = total / torch.clamp(count, min=1.0)
    else:
        raise ValueError(f"unknown combine {combine!r}")
    return merged * scale if scale != 1.0 else merged


def _sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Elementwise sum in order, into a fresh tensor (one term alive at a time)."""
    it = iter(tensors)
    out = next(it).clone()
    for t in it:
        out += t
    return out
