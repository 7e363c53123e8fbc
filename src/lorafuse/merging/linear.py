"""Full-rank weighted average of LoRA deltas, stored exactly as a LoRA of rank sum(r_k).

``sum_k w_k s_k B_k A_k = [w_1 s_1 B_1 | ... | w_K s_K B_K] @ [A_1; ...; A_K]``: stacking the
factors represents the weighted sum of the experts' deltas without loss and without
forming any d_out x d_in matrix. (PEFT's "linear" LoRA merge instead averages A's and B's
separately, which adds cross-terms between experts.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafuse.library import LoraAdapter, LoraFactors, module_factors, union_modules


def linear_merge(
    adapters: Sequence[LoraAdapter], weights: Sequence[float] | None = None
) -> dict[str, LoraFactors]:
    """Exact ``sum_k w_k delta_k`` per module (uniform average when ``weights`` is None)."""
    weights = list(weights) if weights is not None else [1.0 / len(adapters)] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters")
    out: dict[str, LoraFactors] = {}
    for module in union_modules(adapters):
        parts = module_factors(adapters, module)
        out[module] = concat_factors(parts, weights)
    return out


def concat_factors(parts: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """One LoRA whose delta is ``sum_k w_k * parts[k].delta()``, scaling folded into B."""
    A = torch.cat([p.A for p in parts], dim=0)
    B = torch.cat([w * p.scaling * p.B for p, w in zip(parts, weights, strict=True)], dim=1)
    return LoraFactors(A=A.contiguous(), B=B.contiguous(), scaling=1.0)
