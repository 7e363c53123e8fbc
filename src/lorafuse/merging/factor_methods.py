"""Merge methods in factor space: K experts' (A, B) for one module in, one LoRA out.

No d_out x d_in matrix is formed, so these are cheap for any layer size.

* :func:`linear` and :func:`task_arithmetic` are exact: ``sum_k w_k delta_k`` (times ``scale``)
  stored as a rank-``sum r_k`` LoRA by stacking the factors (see ``concat_factors``).
* :func:`lowrank_average` averages the A's and the B's separately. Its delta is **not** the
  average of the deltas: ``(sum_j b_j B_j)(sum_k a_k A_k)`` has cross-terms ``B_j A_k``
  (j != k) between experts. It keeps the experts' rank (PEFT's ``linear`` combination_type).
* :func:`lorahub_compose` is LoRAHub's composition (Huang et al. 2023): the same weight on A
  and on B, ``(sum_k w_k s_k B_k)(sum_k w_k A_k)``, rank r (diagonal terms ``w_k^2 delta_k``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from lorafuse.errors import LorafuseError
from lorafuse.library import LoraFactors
from lorafuse.merging.linear import concat_factors

__all__ = ["linear", "lorahub_compose", "lowrank_average", "task_arithmetic"]


def linear(parts: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """Exact ``sum_k w_k delta_k`` as a LoRA of rank ``sum_k r_k`` (scaling folded into B)."""
    return concat_factors(parts, weights)


def task_arithmetic(
    parts: Sequence[LoraFactors], weights: Sequence[float], *, scale: float = 1.0
) -> LoraFactors:
    """Exact ``scale * sum_k w_k delta_k`` (Ilharco et al.: task vectors added, times lambda)."""
    return concat_factors(parts, [scale * w for w in weights])


def lowrank_average(
    parts: Sequence[LoraFactors],
    weights: Sequence[float],
    *,
    weighting: Literal["average", "sqrt"] = "average",
) -> LoraFactors:
    """Weighted sums of the A's and of the B's separately; all experts must share one rank.

    Each expert's ``c_k * sqrt(|s_k|)`` multiplies both its A and its B (``s_k`` its scaling),
    and the sign of ``w_k * s_k`` goes on A only, so negative weights subtract:

    * ``weighting="average"``: ``c_k = |w_k|``. Identical experts with weights summing to 1
      give back that expert; the diagonal terms are ``w_k |w_k| delta_k``.
    * ``weighting="sqrt"``: ``c_k = sqrt(|w_k|)``, PEFT's ``linear`` combination_type; the
      diagonal terms are exactly ``w_k delta_k``.

    Either way the result ``B_bar @ A_bar`` also holds the cross-terms ``B_j A_k`` (j != k), so
    it differs from :func:`linear` unless those vanish.
    """
    ranks = sorted({p.rank for p in parts})
    if len(ranks) != 1:
        raise LorafuseError(
            f"lowrank_average needs experts of equal rank, got ranks {ranks}; use 'linear' "
            "or an SVD-based method for mixed ranks"
        )
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} experts")
    A = torch.zeros_like(parts[0].A)
    B = torch.zeros_like(parts[0].B)
    for p, w in zip(parts, weights, strict=True):
        signed = w * p.scaling
        if weighting == "sqrt":
            factor = math.sqrt(abs(signed))
        else:
            factor = abs(w) * math.sqrt(abs(p.scaling))
        A += math.copysign(factor, signed) * p.A
        B += factor * p.B
    return LoraFactors(A=A, B=B, scaling=1.0)


def lorahub_compose(parts: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """LoRAHub's composed module: ``A = sum_k w_k A_k`` and ``B = sum_k w_k s_k B_k``.

    As LoRAHub's code, every factor gets its expert's weight, so the delta is
    ``(sum_j w_j s_j B_j)(sum_k w_k A_k)``: rank r, with cross-terms, not ``sum_k w_k delta_k``
    (``s_k``, each expert's scaling, goes on B; with one shared scaling this is the paper's
    ``s (sum w B)(sum w A)``). Undefined for experts of different ranks: refused (a module an
    expert does not adapt counts as zero factors of the others' rank).
    """
    ranks = sorted({p.rank for p in parts})
    if len(ranks) != 1:
        raise LorafuseError(
            f"lorahub composes A's and B's of one rank, got ranks {ranks}; use lorahub_full"
        )
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} experts")
    A = sum(float(w) * p.A for p, w in zip(parts, weights, strict=True))
    B = sum(float(w) * p.scaling * p.B for p, w in zip(parts, weights, strict=True))
    return LoraFactors(A=A.contiguous(), B=B.contiguous(), scaling=1.0)
