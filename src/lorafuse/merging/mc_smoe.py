"""MC-SMoE (Li et al., ICLR 2024), "merge, then compress", for a library of LoRA experts.

A router's statistics on validation inputs (``routing``: N x K weights, one row per input)
decide which experts become one:

1. **frequency** ``f_k``: the share of inputs whose top-1 expert is ``k``;
2. **groups**: the ``g`` most used experts are the dominant ones; every other expert joins the
   dominant expert whose routing column ``routing[:, d]`` is most cosine-similar to its own
   (MC-SMoE compares the router's logits per expert the same way);
3. **merge**: each group becomes ``sum_k f_k delta_k / sum_k f_k`` (uniform if no member is ever
   chosen), exact as a LoRA of rank ``sum r_k`` (stacked factors);
4. **compress**: the merged delta is truncated to rank ``rank`` (its best low-rank
   approximation) and structurally pruned: only the ``density`` fraction of input columns with
   the largest norms are kept (zeroed columns of A). MC-SMoE prunes the merged experts'
   neurons; for a LoRA delta a column of the update is the matching unit.

The ``g`` compressed experts are a smaller library; routing among them still serves every task.
The paper also aligns neurons by permutation before merging; LoRA experts trained from one
base and adapting the same linears share their input/output coordinates, so it is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lorafuse.core.mixture import FactorSet, FactorSource
from lorafuse.library import LoraFactors
from lorafuse.merging.linear import concat_factors
from lorafuse.merging.svd import compress_factors

__all__ = ["compress_expert", "merge_group", "mc_smoe_sources", "routing_groups"]


def routing_groups(routing: torch.Tensor, n_groups: int) -> tuple[list[list[int]], torch.Tensor]:
    """Groups of expert indices (dominant expert first) and the top-1 frequencies (K,)."""
    n, k = routing.shape
    if not 1 <= n_groups <= k:
        raise ValueError(f"n_groups must lie in 1..{k}, got {n_groups}")
    freq = torch.bincount(routing.argmax(1), minlength=k).to(torch.float64) / max(n, 1)
    order = sorted(range(k), key=lambda j: (-float(freq[j]), j))
    dominant = order[:n_groups]
    cols = F.normalize(routing.T.to(torch.float64), dim=1)  # (K, N)
    sim = cols @ cols.T
    groups = {d: [d] for d in dominant}
    for j in range(k):
        if j not in groups:
            best = max(dominant, key=lambda d: (float(sim[j, d]), -dominant.index(d)))
            groups[best].append(j)
    return [groups[d] for d in dominant], freq


def merge_group(parts: Sequence[LoraFactors], freq: Sequence[float]) -> LoraFactors:
    """``sum_k f_k delta_k / sum_k f_k`` as stacked factors (uniform when all f_k are 0)."""
    total = float(sum(freq))
    w = [f / total for f in freq] if total > 0 else [1.0 / len(parts)] * len(parts)
    return concat_factors(parts, w)


def compress_expert(f: LoraFactors, rank: int | None, density: float) -> LoraFactors:
    """Best rank-``rank`` approximation, then keep the ``density`` share of input columns with
    the largest norms (the others' A columns zeroed)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    if rank is not None and rank < f.rank:
        f = compress_factors(f, rank)
    if density >= 1.0:
        return f
    b = f.B * f.scaling
    col_norm2 = ((b.T @ b) @ f.A * f.A).sum(0)  # ||delta[:, j]||^2 = a_j^T B^T B a_j
    keep = max(1, round(density * f.d_in))
    cols = torch.topk(col_norm2, keep).indices
    mask = torch.zeros(f.d_in, dtype=f.A.dtype, device=f.A.device)
    mask[cols] = 1.0
    return LoraFactors(A=(f.A * mask).contiguous(), B=f.B, scaling=f.scaling)


def mc_smoe_sources(
    experts: Sequence[FactorSource],
    routing: torch.Tensor,
    n_groups: int,
    *,
    rank: int | None = None,
    density: float = 1.0,
) -> tuple[list[FactorSet], list[list[int]], torch.Tensor]:
    """The compressed merged experts, the groups and the frequencies (module doc)."""
    groups, freq = routing_groups(routing, n_groups)
    sources = []
    for g, members in enumerate(groups):
        modules = {}
        for m in experts[0].module_names:
            merged = merge_group(
                [experts[k].factors(m) for k in members], [float(freq[k]) for k in members]
            )
            modules[m] = compress_expert(merged, rank, density)
        sources.append(FactorSet(f"mc_smoe{g}", modules))
    return sources, groups, freq
